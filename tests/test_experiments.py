"""The experiment framework without fairseq: stages reused only when their commit file, command and inputs match,
redone when any changed, adopted or refused when made elsewhere; command lines; reports rendered from metrics.json
alone, with no number typed into a template."""
import json
import os
import sys

import pytest

from knnlm_fairseq.experiments import commands as C, report as R
from knnlm_fairseq.experiments.stages import StageFailed, Stages, record_path


def writer(out: str, payload: str = "{}", counter: str = None, exit_code: int = 0, commit: bool = True) -> C.Command:
    """A stand-in CLI: prints, counts its runs in `counter`, writes `out` (its commit file) last."""
    code = ("import sys; print('Loss (base 2): 7.0000, Perplexity: 128.00'); print('Evaluated 1,000 tokens in 2.0s')\n"
            + (f"open({counter!r}, 'a').write('x')\n" if counter else "")
            + (f"open({out!r}, 'w').write({payload!r})\n" if commit else "")
            + f"sys.exit({exit_code})")
    return C.Command([sys.executable, "-c", code], commit=out, outputs=[out])


def runs(counter) -> int:
    return len(open(counter).read()) if os.path.exists(counter) else 0


@pytest.fixture
def work(tmp_path):
    return str(tmp_path / "work")


def test_a_stage_is_timed_logged_and_recorded(work, tmp_path):
    out = str(tmp_path / "a.json")
    stages = Stages(work, reuse=True, echo=lambda s: None)
    text = stages.run("a", writer(out))
    assert C.eval_numbers(text) == {"loss_base2": 7.0, "ppl": 128.0, "tokens": 1000, "tok_s": 500.0}
    rec = json.load(open(record_path(out)))
    assert rec == {k: v for k, v in stages.done["a"].items() if k != "reused"} and not stages.done["a"]["reused"]
    assert rec["seconds"] >= 0 and rec["peak_rss_mb"] > 1 and open(rec["log"]).read() == text


def test_reuse_needs_the_same_command_and_the_same_inputs(work, tmp_path):
    a, b, n_a, n_b = (str(tmp_path / x) for x in ("a.json", "b.json", "na", "nb"))
    quiet = dict(echo=lambda s: None)

    def both(reuse, payload="{}"):
        s = Stages(work, reuse, **quiet)
        s.run("a", writer(a, payload, n_a))
        s.run("b", writer(b, "{}", n_b).reading(a))  # b reads a's output
        return s

    both(True)
    s = both(True)  # everything reused, with the timing of the run that made it
    assert (runs(n_a), runs(n_b)) == (1, 1) and all(r["reused"] for r in s.done.values())
    assert s.done["a"]["seconds"] is not None
    both(False)  # a fresh run makes everything again
    assert (runs(n_a), runs(n_b)) == (2, 2)
    s = Stages(work, True, **quiet)  # a's command changed: a is made again, and so b, whose input changed
    s.run("a", writer(a, '{"v": 2}', n_a))
    s.run("b", writer(b, "{}", n_b).reading(a))
    assert (runs(n_a), runs(n_b)) == (3, 3) and not s.done["b"]["reused"]
    os.remove(s.done["b"]["log"])  # a stage whose log is gone is made again: its numbers are in the log
    both(True, '{"v": 2}')
    assert (runs(n_a), runs(n_b)) == (3, 4)


def test_an_output_made_elsewhere_is_adopted_only_if_it_is_what_the_stage_makes(work, tmp_path):
    out, n = str(tmp_path / "manifest.json"), str(tmp_path / "n")
    with open(out, "w") as f:
        json.dump({"split": "train", "dim": 8}, f)
    cmd = writer(out, counter=n)
    wrong = C.Command(cmd.argv, commit=out, outputs=[out], expect={"split": "valid"})
    with pytest.raises(StageFailed, match="made outside this experiment with other settings .split 'train', not 'valid'"):
        Stages(work, True, echo=lambda s: None).run("dump", wrong)
    said = []
    s = Stages(work, True, echo=said.append)
    s.run("dump", C.Command(cmd.argv, commit=out, outputs=[out], expect={"split": "train"}))
    assert runs(n) == 0 and s.done["dump"]["adopted"] and s.done["dump"]["seconds"] is None
    assert "adopting dump" in said[0] and os.path.exists(record_path(out))
    assert os.path.exists(out)


def test_a_failed_stage_names_its_log_and_leaves_nothing_to_reuse(work, tmp_path):
    out = str(tmp_path / "a.json")
    with pytest.raises(StageFailed, match=r"(?s)stage a failed \(exit 3\); log: .*a.log.failed\n.*Evaluated"):
        Stages(work, True, echo=lambda s: None).run("a", writer(out, exit_code=3))
    with pytest.raises(StageFailed, match="exited 0 but wrote no"):
        Stages(work, True, echo=lambda s: None).run("a", writer(out, commit=False))
    assert not os.path.exists(out) and not os.path.exists(record_path(out))


def test_a_stage_without_a_commit_file_commits_its_log(work, tmp_path):
    n = str(tmp_path / "n")
    cmd = writer(str(tmp_path / "ignored"), counter=n)
    cmd = C.Command(cmd.argv)  # prints only: the log is renamed into place when it succeeds
    for _ in range(2):
        s = Stages(work, True, echo=lambda s: None)
        assert C.eval_numbers(s.run("base", cmd))["ppl"] == 128.0
    assert runs(n) == 1 and s.done["base"]["reused"] and os.path.exists(record_path(s.log_path("base")))


def test_an_in_process_step_follows_the_same_rule(work, tmp_path):
    out, calls = str(tmp_path / "slice" / "manifest.json"), []

    def step():
        calls.append(1)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        open(out, "w").write("{}")

    for desc in (["slice", 10], ["slice", 10], ["slice", 25]):
        Stages(work, True, echo=lambda s: None).call("slice", C.in_process(desc, out, [os.path.dirname(out)]), step)
    assert len(calls) == 2
    assert json.load(open(record_path(out)))["command"] == "(in process) slice 25"


def test_command_lines_name_their_commit_inputs_and_outputs():
    window = ("bin", "m.pt", "valid", 512, 256, 8192, ["--cpu"])
    dump = C.dump(*window, dstore="ds", keytype="last_ffn_output")
    assert dump.commit == os.path.join("ds", "manifest.json") and dump.outputs == ["ds"]
    assert dump.expect == {"split": "valid", "tokens_per_sample": 512, "context_window": 256, "key_type": "last_ffn_output"}
    assert dump.printable().startswith("fairseq-eval-lm bin --path m.pt --gen-subset valid --tokens-per-sample 512 ")
    assert "--user-dir knnlm_fairseq --task knn_eval --knn-keytype last_ffn_output --save-dstore" in dump.printable()
    knn = C.knn_eval(*window, dstore="ds", k=8, lmbda=0.25, temp=10.0, probe=4, retrieval_log="r")
    assert knn.commit == os.path.join("r", "meta.json")
    assert knn.inputs == ["m.pt", os.path.join("bin", "valid.bin"), os.path.join("ds", "manifest.json"),
                          os.path.join("ds", "index.faiss.json")]
    assert C.build_index("ds", "IVF8,PQ4", 100).commit == os.path.join("ds", "index.faiss.json")
    sweep = C.sweep(["r", "t"], "s.json", [0.0, 0.5], [8], [1.0])
    assert sweep.printable().startswith("knnlm-sweep r t --lmbdas 0.0,0.5 --ks 8 --temps 1.0")
    assert sweep.inputs == [os.path.join("r", "meta.json"), os.path.join("t", "meta.json")]
    assert knn.nice().printable().startswith("nice -n 10 fairseq-eval-lm") and knn.nice().identity() == knn.identity()


def test_training_curve_parses_fairseq_train():
    log = ("epoch 001 | loss 9.1 | ppl 549 | wps 708.6 | ups 0.1\n"
           "epoch 001 | valid on 'valid' subset | loss 9.7 | nll_loss 9.7 | ppl 836.1 | wps 1 | num_updates 51\n"
           "Stopping training due to cumulative_training_time: 1300 > stop_time_hours: 0.35 hour(s)\n")
    assert C.training_curve(log) == {"epochs": [{"epoch": 1, "valid_ppl": 836.1, "num_updates": 51, "train_wps": 708.6}],
                                     "stopped_by_time": True, "stop_time_hours": 0.35}


def test_prose_refuses_a_typed_number_but_not_a_reference():
    assert R.prose("λ {l} on {n:,} tokens (Table 3, Grave et al. (2017)).", l=0.25, n=12345) == \
        "λ 0.25 on 12,345 tokens (Table 3, Grave et al. (2017))."
    for typed in ("the 25-minute cap", "on 2 cores", "ppl {p} vs 16.12", "a {x}k"):
        if R.numbers(typed.replace("{p}", "").replace("{x}", "")):
            with pytest.raises(AssertionError, match="numbers typed into a report template"):
                R.prose(typed, p=1, x=2)
    assert R.numbers("WikiText-2, IVF1024,PQ32, wt2_small, 19th, p = (1 − λ)") == []
    assert R.numbers("-16.0% of 217,646 at T=10, 3B") == ["-16.0", "217,646", "10", "3"]


def test_tables_and_grids():
    assert R.table(["a", "b"], [[1, ""], ["x", 2.5]], "lr") == "| a | b |\n|---|---:|\n| 1 | |\n| x | 2.5 |"
    assert R.grid_text([i / 100 for i in range(10)] + [round(0.05 * i, 2) for i in range(2, 19)]) == "0, 0.01, …, 0.1, 0.15, …, 0.9"
    assert R.grid_text([1.0, 3.0, 10.0, 30.0]) == "1, 3, 10, 30"
    assert R.stage_rows({"dump": {"seconds": None, "peak_rss_mb": 2.5, "command": "x", "reused": True}}) == \
        [["dump", "—", "2.5", "(reused) `x`"]]


def test_publish_renders_from_what_metrics_json_holds(tmp_path):
    seen = []

    def render(m):
        seen.append(m)
        return R.prose("{n} rows of {k}", n=len(m["rows"]), k=sorted(m["rows"])[0])

    text = R.publish(str(tmp_path), {"rows": {10: (1, 2), 25: (3, 4)}}, render)
    assert seen == [{"rows": {"10": [1, 2], "25": [3, 4]}}]  # keys and tuples as JSON gives them back
    assert text == open(tmp_path / "report.md").read() == "2 rows of 10"
    assert R.render_to(str(tmp_path), render) == text


def test_an_output_of_another_experiment_is_kept_whatever_made_it(work, tmp_path):
    out, n = str(tmp_path / "manifest.json"), str(tmp_path / "n")
    Stages(str(tmp_path / "other"), True, echo=lambda s: None).run("dump", writer(out, '{"split": "train"}', n))
    made = json.load(open(record_path(out)))
    mine = C.Command(writer(out, '{"split": "train"}', n).argv + ["--max-tokens", "9"], commit=out, outputs=[out],
                     expect={"split": "train"})
    s = Stages(work, True, echo=lambda s: None)
    s.run("dump_wiki", mine, keep=True)  # another command made it: kept, its record untouched
    assert runs(n) == 1 and s.done["dump_wiki"]["command"] == made["command"]
    assert json.load(open(record_path(out))) == made
    with pytest.raises(StageFailed, match="split 'train', not 'valid'"):
        s.run("dump_wiki", C.Command(mine.argv, commit=out, outputs=[out], expect={"split": "valid"}), keep=True)
