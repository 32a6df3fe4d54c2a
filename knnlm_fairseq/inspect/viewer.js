// knnlm-inspect page: reads the JSON embedded once in the page, builds the spans of one page of tokens at a time
// and a token's neighbour panel only when it is hovered or clicked. All text goes in through textContent.
(function () {
  "use strict";
  const t0 = performance.now();
  const byId = (id) => document.getElementById(id);
  const D = JSON.parse(byId("knnlm-data").textContent);
  const C = JSON.parse(byId("knnlm-config").textContent);
  const V = D.vocab, T = D.tokens, N = T.w.length;
  const PS = C.pageSize, PAGES = Math.max(1, Math.ceil(N / PS));
  const STEP_NEG = C.scale[0] / 5, STEP_POS = C.scale[1] / 5;  // one scale per side (html.colour_scale)
  const EOS = V.indexOf("</s>");
  const passage = byId("passage"), panel = byId("panel"), label = byId("page-label");
  let page = -1, start = 0, spans = [], pinned = -1;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // "pos l3": the sign of the gain, then its size in fifths of the colour scale (the legend's swatches)
  function shade(g) {
    if (!(g > 0 || g < 0)) return "zero";
    const step = g > 0 ? STEP_POS : STEP_NEG;
    return (g > 0 ? "pos" : "neg") + " l" + Math.min(5, Math.max(1, Math.ceil(Math.abs(g) / step)));
  }

  const prob = (x) => (x !== 0 && x < 1e-3 ? x.toExponential(2) : x.toFixed(4));
  const signed = (x, d) => (x > 0 ? "+" : "") + x.toFixed(d);

  function renderPage(p) {
    page = Math.min(Math.max(p, 0), PAGES - 1);
    start = page * PS;
    const end = Math.min(N, start + PS);
    const frag = document.createDocumentFragment();
    spans = new Array(end - start);
    for (let i = start; i < end; i++) {
      const eos = T.w[i] === EOS;
      const s = el("span", "t " + shade(T.gain[i]) + (eos ? " eos" : ""), eos ? "↵" : V[T.w[i]]);
      s.dataset.i = i;
      if (i === pinned) s.classList.add("pinned");
      spans[i - start] = s;
      frag.appendChild(s);
      frag.appendChild(eos ? el("br") : document.createTextNode(" "));
    }
    passage.replaceChildren(frag);
    passage.dataset.page = page + 1;
    label.textContent = `page ${page + 1} of ${PAGES} · tokens ${start}–${Math.max(start, end - 1)} of ${N}`;
    for (const b of document.querySelectorAll(".pager button")) {
      const go = b.dataset.go;
      b.disabled = (go === "first" || go === "prev") ? page === 0 : page === PAGES - 1;
    }
  }

  // the neighbour panel of token i, built on demand
  function showPanel(i) {
    const w = T.w[i], nbs = T.nb[i];
    const frag = document.createDocumentFragment();
    const h = el("h2", null, `token ${i} `);
    h.appendChild(el("span", "word " + shade(T.gain[i]), V[w]));
    h.appendChild(el("span", "pin", i === pinned ? " pinned" : " (click to pin)"));
    frag.appendChild(h);
    const dl = el("dl", "probs");
    for (const [name, text, cls] of [["p_LM", prob(T.lm[i])], ["p_kNN", prob(T.knn[i])], ["p", prob(T.p[i])],
                                     ["gain (nats)", signed(T.gain[i], 3), shade(T.gain[i]).split(" ")[0]]]) {
      dl.appendChild(el("dt", null, name));
      dl.appendChild(el("dd", "num " + (cls || ""), text)).dataset.name = name;
    }
    frag.appendChild(dl);
    let onToken = 0, matches = 0;
    for (const nb of nbs) if (nb[3] === w) { onToken += nb[2]; matches++; }
    frag.appendChild(el("p", "note", `${nbs.length} neighbours shown (k = ${D.meta.k}); ${matches} predict ` +
      `“${V[w]}”, with weight ${onToken.toFixed(3)} of p_kNN`));
    if (nbs.length) {
      const table = el("table", "nbs");
      const head = table.appendChild(el("thead")).appendChild(el("tr"));
      for (const c of ["#", "row", "distance", "weight", "value", "", "context (the value marked)"]) head.appendChild(el("th", null, c));
      const body = table.appendChild(el("tbody"));
      nbs.forEach((nb, r) => {
        const [row, dist, weight, value, ctx, at] = nb;
        const tr = body.appendChild(el("tr", "nb" + (value === w ? " match" : "")));
        tr.appendChild(el("td", null, String(r + 1)));
        tr.appendChild(el("td", null, String(row)));
        tr.appendChild(el("td", null, dist.toPrecision(4)));
        tr.appendChild(el("td", null, weight.toFixed(3)));
        tr.appendChild(el("td", "val", V[value]));
        tr.appendChild(el("td", "ok")).title = value === w ? "predicts the token" : "";
        const cell = tr.appendChild(el("td", "ctx"));
        if (!ctx.length) cell.appendChild(el("em", null, "(context not available)"));
        ctx.forEach((c, j) => {
          if (j) cell.appendChild(document.createTextNode(" "));
          cell.appendChild(el(j === at ? "mark" : "span", null, V[c]));
        });
      });
      frag.appendChild(table);
    }
    panel.replaceChildren(frag);
    panel.dataset.token = i;
  }

  function spanOf(i) { return i >= start && i < start + spans.length ? spans[i - start] : null; }

  function pin(i, scroll) {
    const before = pinned;
    if (before >= 0 && spanOf(before)) spanOf(before).classList.remove("pinned");
    pinned = i;
    if (i < 0) {  // unpinned: the panel stays on that token, ready for the next hover
      if (before >= 0) showPanel(before);
      try { history.replaceState(null, "", location.pathname + location.search); } catch (e) { /* file:// */ }
      return;
    }
    if (Math.floor(i / PS) !== page) renderPage(Math.floor(i / PS));
    const s = spanOf(i);
    s.classList.add("pinned");
    showPanel(i);
    if (scroll) {
      s.scrollIntoView({ block: "center" });
      s.classList.remove("flash");
      void s.offsetWidth;  // restart the animation
      s.classList.add("flash");
    }
    try { history.replaceState(null, "", "#t=" + i); } catch (e) { /* some file:// settings refuse it */ }
  }

  function tokenOf(e) {
    const s = e.target.closest ? e.target.closest("span.t") : null;
    return s ? Number(s.dataset.i) : -1;
  }

  passage.addEventListener("mouseover", (e) => {
    const i = tokenOf(e);
    if (i >= 0 && pinned < 0 && Number(panel.dataset.token) !== i) showPanel(i);
  });
  passage.addEventListener("click", (e) => {
    const i = tokenOf(e);
    if (i < 0) return;
    pin(i === pinned ? -1 : i, false);
  });
  for (const b of document.querySelectorAll(".pager button")) {
    b.addEventListener("click", () => {
      const go = b.dataset.go;
      renderPage(go === "first" ? 0 : go === "last" ? PAGES - 1 : page + (go === "next" ? 1 : -1));
      passage.scrollIntoView({ block: "start" });
    });
  }
  byId("goto").addEventListener("keydown", (e) => {
    const i = Math.floor(Number(e.target.value));
    if (e.key === "Enter" && i >= 0 && i < N) { pin(i, true); e.target.blur(); }  // the arrow keys step from there
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    if (e.key === "Escape" && pinned >= 0) pin(-1);
    else if (e.key === "ArrowRight" && pinned >= 0 && pinned + 1 < N) { e.preventDefault(); pin(pinned + 1, true); }
    else if (e.key === "ArrowLeft" && pinned > 0) { e.preventDefault(); pin(pinned - 1, true); }
  });

  // largest gains and losses over the whole split, each a link to its token
  function extremes(list, order, keep) {
    const idx = [];
    for (let i = 0; i < N; i++) if (keep(T.gain[i])) idx.push(i);
    idx.sort((a, b) => order * (T.gain[b] - T.gain[a]) || a - b);
    const ol = byId(list);
    for (const i of idx.slice(0, C.top)) {
      const a = ol.appendChild(el("li")).appendChild(el("a"));
      a.dataset.i = i;
      a.appendChild(el("span", "num " + shade(T.gain[i]).split(" ")[0], signed(T.gain[i], 3)));
      a.appendChild(document.createTextNode(` “${V[T.w[i]]}” (token ${i})`));
      a.addEventListener("click", () => pin(i, true));
    }
    if (!idx.length) ol.appendChild(el("li", "note", "none"));
  }
  extremes("top-gains", 1, (g) => g > 0);
  extremes("top-losses", -1, (g) => g < 0);

  const m = /^#t=(\d+)$/.exec(location.hash);
  if (m && Number(m[1]) < N) pin(Number(m[1]), true); else renderPage(0);
  window.knnlmViewer = { buildMs: performance.now() - t0, goTo: (i) => pin(i, true) };
  document.body.dataset.ready = "1";
})();
