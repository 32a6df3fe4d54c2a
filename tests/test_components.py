"""The evaluation pipeline (components/) on a tiny torch decoder and a real datastore + Flat index: what the
docs promise a new component can do (skip retrieval per row, set λ per row), checked against a numpy oracle."""
import numpy as np
import pytest
import torch
from torch import nn

from knnlm_fairseq.components.base import Component, Pipeline
from knnlm_fairseq.components.knn import KnnMixer, KnnSearch
from knnlm_fairseq.core import index as ix
from knnlm_fairseq.core.datastore import Datastore
from knnlm_fairseq.core.retriever import open_retriever
from knnlm_fairseq.core.writer import DatastoreWriter

DIM, V, N_DSTORE, B, T, K, PAD = 8, 50, 600, 3, 11, 16, 1
LMBDA, TEMP = 0.4, 5.0


class Block(nn.Module):
    """A pre-norm FFN block with fairseq's submodule names (time-first tensors, as fairseq's layers)."""

    def __init__(self):
        super().__init__()
        self.embed_dim = DIM
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(DIM), nn.Identity()
        self.final_layer_norm, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.final_layer_norm(x))))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.layers, self.out = nn.Embedding(V, DIM), nn.ModuleList([Block(), Block()]), nn.Linear(DIM, V)

    def forward(self, tokens):  # (B, T) -> log-probs (B, T, V)
        x = self.embed(tokens).transpose(0, 1)  # (T, B, C)
        for layer in self.layers:
            x = layer(x)
        return torch.log_softmax(self.out(x.transpose(0, 1)), -1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dstore"))
    rng = np.random.default_rng(0)
    w = DatastoreWriter(path, DIM, V, {"key_type": "last_ffn_input", "checkpoint": {"sha256": "c"},
                                       "dictionary": {"sha256": "d", "size": V}})
    w.add(rng.normal(size=(N_DSTORE, DIM)).astype(np.float32), rng.integers(4, V, N_DSTORE))
    w.close()
    ix.build_index(Datastore.open(path), f"{path}/index.faiss", factory="Flat", progress=False)
    retriever = open_retriever(path, "index.faiss", k=K, nprobe=1, exact=True)
    tokens = torch.from_numpy(rng.integers(4, V, (B, T)))
    target = tokens.roll(-1, 1)
    target[:, :2] = PAD  # a context window: never scored
    target[-1, -3:] = PAD  # a short last block
    return Decoder().eval(), retriever, tokens, target


def run(setup, components, chunks=1):
    decoder, retriever, tokens, target = setup
    pipe = Pipeline(decoder, components, PAD)
    with torch.no_grad():
        lm = decoder(tokens)  # (B, T, V)
        pipe.on_forward(tokens)
        flat_lm, flat_t = lm.reshape(1, B * T, V), target.reshape(1, B * T)
        bounds = np.linspace(0, B * T, chunks + 1).astype(int)  # the way --softmax-batch chunks a batch
        out = torch.cat([pipe.on_scores(flat_lm[:, s:e].clone(), flat_t[:, s:e])
                         for s, e in zip(bounds[:-1], bounds[1:])], 1)
    pipe.remove()
    return lm.reshape(B * T, V), out.reshape(B * T, V)


def oracle(setup, lmbda):
    """log(λ p_kNN + (1-λ) p_LM) for every row, from a brute-force float64 search of the stored keys."""
    decoder, retriever, tokens, _ = setup
    feats = []
    h = decoder.layers[-1].fc1.register_forward_pre_hook(lambda m, a: feats.append(a[0].transpose(0, 1)))
    with torch.no_grad():
        lm = decoder(tokens).reshape(B * T, V).double().numpy()
    h.remove()
    q = feats[0].reshape(B * T, DIM).double().numpy()
    keys = np.asarray(retriever.dstore.keys, dtype=np.float64)
    vals = np.asarray(retriever.dstore.vals)
    d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)  # (BT, n)
    nn_ = np.argsort(d, 1)[:, :K]
    w = np.exp(-(np.take_along_axis(d, nn_, 1) - d.min(1, keepdims=True)) / TEMP)
    p_knn = np.zeros((B * T, V))
    for r in range(B * T):
        np.add.at(p_knn[r], vals[nn_[r]], w[r] / w[r].sum())
    return lm, np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lm))


class EveryOtherToken(Component):
    """The docs' example: only even flat positions search; odd ones keep the LM."""

    def on_scores(self, step):
        step.search &= (step.rows + step.first) % 2 == 0


class LambdaByPosition(Component):
    """A per-token λ: 0 on positions divisible by 3, LMBDA elsewhere."""

    def on_scores(self, step):
        step.lmbda = torch.where((step.rows + step.first) % 3 == 0, 0.0, LMBDA)


def scored_rows(setup):
    return (setup[3].reshape(-1) != PAD).numpy()


@pytest.mark.parametrize("chunks", [1, 4])
def test_full_pipeline_matches_the_oracle(setup, chunks):
    _, retriever, _, _ = setup
    lm, out = run(setup, [KnnSearch(retriever, "last_ffn_input"), KnnMixer(LMBDA, TEMP, "exact")], chunks)
    _, want = oracle(setup, LMBDA)
    s = scored_rows(setup)
    np.testing.assert_allclose(out.numpy()[s], want[s], atol=2e-3)  # fp16 stored keys
    torch.testing.assert_close(out[~s], lm[~s], rtol=0, atol=0)  # context window and padding untouched


def test_gate_skips_retrieval_per_row(setup):
    _, retriever, _, _ = setup
    search = KnnSearch(retriever, "last_ffn_input")
    lm, out = run(setup, [EveryOtherToken(), search, KnnMixer(LMBDA, TEMP, "exact")], chunks=3)
    _, full = run(setup, [KnnSearch(retriever, "last_ffn_input"), KnnMixer(LMBDA, TEMP, "exact")])
    s = scored_rows(setup)
    even = np.arange(B * T) % 2 == 0
    torch.testing.assert_close(out[s & ~even], lm[s & ~even], rtol=0, atol=0)  # skipped: the LM exactly
    torch.testing.assert_close(out[s & even], full[s & even], rtol=0, atol=1e-6)  # searched: kNN-LM
    assert search.close()["searched"] == int((s & even).sum())  # the skipped rows never reached faiss


def test_per_row_lambda(setup):
    _, retriever, _, _ = setup
    lm, out = run(setup, [LambdaByPosition(), KnnSearch(retriever, "last_ffn_input"),
                          KnnMixer(0.9, TEMP, "exact")])  # the per-row λ wins over the mixer's own
    _, want = oracle(setup, LMBDA)
    s = scored_rows(setup)
    third = np.arange(B * T) % 3 == 0
    torch.testing.assert_close(out[s & third], lm[s & third], rtol=0, atol=0)
    np.testing.assert_allclose(out.numpy()[s & ~third], want[s & ~third], atol=2e-3)


class Recorder(Component):
    def __init__(self):
        self.starts, self.rows = [], []

    def on_scores(self, step):
        self.starts.append(step.block_start.clone())
        self.rows.append(step.rows + step.first)


@pytest.mark.parametrize("chunks", [1, 2, 5, B * T])
def test_block_start_marks_each_blocks_first_scored_row(setup, chunks):
    """The first scored row of each block (after its context window), whatever the chunking: where a chain of
    reused neighbours must search again."""
    rec = Recorder()
    run(setup, [rec], chunks)
    starts, rows = torch.cat(rec.starts), torch.cat(rec.rows)
    np.testing.assert_array_equal(rows[starts].numpy(), [b * T + 2 for b in range(B)])


def test_target_only_mixing_equals_full_at_the_targets(setup):
    """--knn-mix target: each scored row's target gets exactly the full mix's value; other words keep the LM's."""
    _, retriever, tokens, target = setup
    lm, full = run(setup, [KnnSearch(retriever, "last_ffn_input"), KnnMixer(LMBDA, TEMP, "exact")], chunks=2)
    _, fast = run(setup, [KnnSearch(retriever, "last_ffn_input"), KnnMixer(LMBDA, TEMP, "exact", target_only=True)],
                  chunks=2)
    s = scored_rows(setup)
    t = target.reshape(-1)
    rows = torch.arange(B * T)[torch.from_numpy(s)]
    torch.testing.assert_close(fast[rows, t[rows]], full[rows, t[rows]], rtol=0, atol=2e-6)
    untouched = torch.ones_like(fast, dtype=torch.bool)
    untouched[rows, t[rows]] = False
    assert torch.equal(fast[untouched], lm[untouched])
