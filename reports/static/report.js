/* convlens report: lazy thumbnails, WebGL feature-map scatter with hover / click neighbours.
   All data comes from the JSON script elements; every string is inserted with textContent (never as HTML). */
(function () {
  "use strict";
  var pointsEl = document.getElementById("cl-points");
  var thumbsEl = document.getElementById("cl-thumbs");
  var P = JSON.parse(pointsEl.textContent);
  /* every point's path / label / prediction come in a script element of their own, parsed on first use (hover,
     a caption) or once the map has painted: at a million points it is most of the JSON, and the map needs none of it */
  var textEl = document.getElementById("cl-points-text");
  var PT = null;
  function pointText() { if (PT === null) { PT = JSON.parse(textEl.textContent); } return PT; }
  if (textEl && P.path === undefined) {
    ["path", "label", "pred"].forEach(function (key) {
      Object.defineProperty(P, key, { enumerable: true, configurable: true, get: function () { return pointText()[key]; } });
    });
  }
  var TH = null;
  function thumbs() { if (TH === null) { TH = JSON.parse(thumbsEl.textContent); } return TH; }
  function thumbOf(row) { var u = thumbs()[String(row)]; return typeof u === "string" && u.indexOf("data:image/") === 0 ? u : null; }
  function text(tag, value, cls) { var el = document.createElement(tag); el.textContent = value == null ? "" : String(value); if (cls) { el.className = cls; } return el; }
  function describe(row) { return (P.label[row] ? P.label[row] : "(no label)") + (P.pred[row] ? " · pred " + P.pred[row] : ""); }

  /* ---- lazy thumbnails in galleries: <img data-thumb="ROW"> ---- */
  function fill(img) {
    var row = img.getAttribute("data-thumb");
    img.removeAttribute("data-thumb");
    img.setAttribute("data-row", row);
    var u = thumbOf(row);
    if (u) { img.src = u; } else { img.classList.add("nothumb"); }
    var r = parseInt(row, 10);
    if (!isNaN(r) && r >= 0 && r < P.n) {
      img.title = P.path[r] + "\n" + describe(r);
      var cap = img.parentNode && img.parentNode.querySelector ? img.parentNode.querySelector("figcaption") : null;
      if (cap && !cap.textContent) { cap.textContent = describe(r); }
    }
  }
  var lazy = document.querySelectorAll("img[data-thumb]");
  if ("IntersectionObserver" in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { io.unobserve(e.target); fill(e.target); } });
    }, { rootMargin: "400px" });
    lazy.forEach(function (img) { io.observe(img); });
  } else {
    lazy.forEach(fill);
  }

  /* ---- scatter ---- */
  var gd = document.getElementById("cl-scatter");
  var api = { ready: false, fill: fill, thumbOf: thumbOf };
  window.convlens = api;
  if (gd && P.bin && window.ConvlensScatter) {  // every point, binary payload, WebGL: static/scatter.js
    window.ConvlensScatter.mount(gd, P, api, { thumbOf: thumbOf, describe: describe, text: text });
    if (textEl) { setTimeout(function () { void P.path; }, 50); }  // parse the text after the first paint
    return;
  }
  if (!gd || typeof Plotly === "undefined") { api.ready = true; return; }
  var shown = P.shown;                        // null: every row is shown, index == row
  var nShown = shown ? shown.length : P.n;
  function rowOf(i) { return shown ? shown[i] : i; }
  var indexOfRow = null;
  function idxOf(row) {
    if (!shown) { return row; }
    if (indexOfRow === null) { indexOfRow = {}; for (var i = 0; i < shown.length; i++) { indexOfRow[shown[i]] = i; } }
    return indexOfRow[row] === undefined ? -1 : indexOfRow[row];
  }
  var qpos = {};
  for (var qi = 0; qi < P.q.length; qi++) { qpos[P.q[qi]] = qi; }

  var projNames = Object.keys(P.proj);
  var colorNames = Object.keys(P.color);
  var projSel = document.getElementById("cl-proj");
  var colorSel = document.getElementById("cl-color");
  colorNames.forEach(function (c) { var o = document.createElement("option"); o.value = c; o.textContent = c; colorSel.appendChild(o); });
  var proj = projNames[0];
  var colorBy = colorNames.indexOf("label") >= 0 ? "label" : colorNames[0];
  colorSel.value = colorBy;

  function colorsFor(name) {
    var c = P.color[name];
    var out = new Array(nShown);
    for (var i = 0; i < nShown; i++) {
      var k = c ? c.idx[rowOf(i)] : 0;
      out[i] = k < P.palette.length ? P.palette[k] : "#b0b0b0";
    }
    return out;
  }
  function legend(name) {
    var box = document.getElementById("cl-legend");
    box.textContent = "";
    var c = P.color[name];
    if (!c) { return; }
    box.appendChild(text("div", "colour: " + name, "legend-title"));
    for (var k = 0; k < c.cats.length && k < P.palette.length; k++) {
      var item = document.createElement("div");
      item.className = "legend-item";
      var sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = P.palette[k];
      item.appendChild(sw);
      item.appendChild(text("span", c.cats[k] + " (" + c.counts[k] + ")"));
      box.appendChild(item);
    }
    if (c.cats.length > P.palette.length) { box.appendChild(text("div", "+ " + (c.cats.length - P.palette.length) + " more (grey)", "legend-more")); }
  }

  function webglOK() {
    try { var cv = document.createElement("canvas"); return !!(window.WebGLRenderingContext && (cv.getContext("webgl") || cv.getContext("experimental-webgl"))); }
    catch (e) { return false; }
  }
  var gl = webglOK();
  var trace = {
    type: gl ? "scattergl" : "scatter", mode: "markers",
    x: P.proj[proj].x, y: P.proj[proj].y,
    marker: { size: nShown > 20000 ? 3 : (nShown > 2000 ? 5 : 8), color: colorsFor(colorBy), opacity: 0.85 },
    hoverinfo: "none"
  };
  var layout = {
    margin: { l: 40, r: 10, t: 10, b: 30 }, hovermode: "closest", dragmode: "zoom", showlegend: false,
    xaxis: { zeroline: false, showgrid: false }, yaxis: { zeroline: false, showgrid: false },
    plot_bgcolor: "#fafafa", paper_bgcolor: "#ffffff"
  };
  var config = { displaylogo: false, responsive: true, scrollZoom: true, modeBarButtonsToRemove: ["toImage", "sendDataToCloud"] };
  api.renderer = trace.type;
  if (!gl) {
    var warn = text("p", "WebGL is not available in this browser: the scatter is drawn with SVG and may be slow for many points.", "hint");
    gd.parentNode.insertBefore(warn, gd);
  }

  var hoverBox = document.getElementById("cl-hover");
  var hoverImg = document.getElementById("cl-hover-img");
  var hoverText = document.getElementById("cl-hover-text");
  function showHover(row) {
    hoverBox.setAttribute("data-row", String(row));
    var u = thumbOf(row);
    if (u) { hoverImg.src = u; hoverImg.style.visibility = "visible"; } else { hoverImg.removeAttribute("src"); hoverImg.style.visibility = "hidden"; }
    hoverText.textContent = "";
    hoverText.appendChild(text("div", "label: " + (P.label[row] || "(none)")));
    if (P.pred[row]) { hoverText.appendChild(text("div", "prediction: " + P.pred[row])); }
    hoverText.appendChild(text("div", P.path[row], "path"));
    if (!u) { hoverText.appendChild(text("div", "(no thumbnail embedded: sampled out or unreadable)", "hint")); }
  }

  function figure(row, caption) {
    var fig = document.createElement("figure");
    fig.className = "th nb";
    fig.setAttribute("data-row", String(row));
    var img = document.createElement("img");
    img.width = 80; img.height = 80; img.alt = "";
    var u = thumbOf(row);
    if (u) { img.src = u; } else { img.className = "nothumb"; }
    img.title = P.path[row] + "\n" + describe(row);
    fig.appendChild(img);
    fig.appendChild(text("figcaption", caption));
    fig.addEventListener("click", function () { showNeighbours(row); showHover(row); });
    return fig;
  }
  function showNeighbours(row) {
    var panel = document.getElementById("cl-neighbours");
    panel.setAttribute("data-row", String(row));
    panel.textContent = "";
    var head = document.createElement("div");
    head.className = "nb-head";
    head.appendChild(figure(row, describe(row)));
    head.appendChild(text("div", P.path[row], "mono"));
    panel.appendChild(head);
    var q = qpos[row];
    if (q === undefined || !P.k) {
      panel.appendChild(text("p", "Neighbours were not embedded for this point (the report samples neighbour queries above its limit).", "hint"));
      return;
    }
    [["Feature space (" + P.knn_source + ")", P.nf, "feature"], ["Pixel space (" + (P.pix_source || "exact L2 on 16×16 RGB thumbnails") + ")", P.np, "pixel"]].forEach(function (spec) {
      var rowEl = document.createElement("div");
      rowEl.className = "nb-row";
      rowEl.setAttribute("data-space", spec[2]);
      rowEl.appendChild(text("h4", spec[0]));
      var gal = document.createElement("div");
      gal.className = "gallery";
      for (var j = 0; j < P.k; j++) {
        var nb = spec[1][q * P.k + j];
        if (nb === undefined || nb < 0) { continue; }
        gal.appendChild(figure(nb, (j + 1) + ". " + describe(nb)));
      }
      rowEl.appendChild(gal);
      panel.appendChild(rowEl);
    });
  }

  function pointPixel(row) {
    var i = idxOf(row);
    if (i < 0) { return null; }
    var fl = gd._fullLayout;
    var rect = gd.getBoundingClientRect();
    var xs = P.proj[proj].x, ys = P.proj[proj].y;
    return { x: rect.left + fl.xaxis._offset + fl.xaxis.l2p(xs[i]), y: rect.top + fl.yaxis._offset + fl.yaxis.l2p(ys[i]) };
  }

  Plotly.newPlot(gd, [trace], layout, config).then(function () {
    legend(colorBy);
    gd.on("plotly_hover", function (ev) {
      if (!ev || !ev.points || !ev.points.length) { return; }
      var p = ev.points[0];
      showHover(rowOf(p.pointIndex !== undefined ? p.pointIndex : p.pointNumber));
    });
    gd.on("plotly_click", function (ev) {
      if (!ev || !ev.points || !ev.points.length) { return; }
      var p = ev.points[0];
      var row = rowOf(p.pointIndex !== undefined ? p.pointIndex : p.pointNumber);
      showHover(row);
      showNeighbours(row);
    });
    colorSel.addEventListener("change", function () {
      colorBy = colorSel.value;
      Plotly.restyle(gd, { "marker.color": [colorsFor(colorBy)] });
      legend(colorBy);
    });
    projSel.addEventListener("change", function () {
      proj = projSel.value;
      Plotly.react(gd, [Object.assign({}, trace, { x: P.proj[proj].x, y: P.proj[proj].y, marker: Object.assign({}, trace.marker, { color: colorsFor(colorBy) }) })],
        Object.assign({}, layout, { xaxis: { zeroline: false, showgrid: false, autorange: true }, yaxis: { zeroline: false, showgrid: false, autorange: true } }), config);
    });
    api.ready = true;
  });
  api.gd = gd; api.rowOf = rowOf; api.idxOf = idxOf; api.showHover = showHover; api.showNeighbours = showNeighbours;
  api.pointPixel = pointPixel; api.points = P;
})();

/* ---- one row per image: sortable, filterable, paged table (#images; data in #cl-images) ---- */
(function () {
  "use strict";
  var el = document.getElementById("cl-images");
  var table = document.getElementById("it-table");
  if (!el || !table) { return; }
  var D = JSON.parse(el.textContent);
  var rows = D.rows;
  rows.forEach(function (r) {  // empty values are left out of the payload
    ["l", "s", "pr", "sg", "dup", "lk", "sl", "b"].forEach(function (k) { if (r[k] === undefined) { r[k] = ""; } });
    ["f", "u", "nf", "rf"].forEach(function (k) { if (r[k] === undefined) { r[k] = []; } });
    ["a", "sa"].forEach(function (k) { if (r[k] === undefined) { r[k] = {}; } });
    ["c", "ok", "g", "ls", "o", "bg", "nw", "ch"].forEach(function (k) { if (r[k] === undefined) { r[k] = null; } });
  });
  var total = D.n || rows.length;
  var PAGE = 50;
  var $ = function (id) { return document.getElementById(id); };
  var st = { q: "", finding: "", method: "", ins: null, unreliable: false, wrong: false, since: false, sort: null, desc: false, page: 0 };
  var view = rows;

  function txt(tag, value, cls) { var e = document.createElement(tag); e.textContent = value == null ? "" : String(value); if (cls) { e.className = cls; } return e; }
  function minIns(r) { var m = null; Object.keys(r.a).forEach(function (k) { var v = r.a[k][1]; if (v != null && (m === null || v < m)) { m = v; } }); return m; }
  function insOf(r) { if (st.method) { return r.a[st.method] ? r.a[st.method][1] : null; } return minIns(r); }
  function keep(r) {
    if (st.q) { var hay = (r.p + " " + r.l + " " + r.pr + " " + r.sg).toLowerCase(); if (hay.indexOf(st.q) < 0) { return false; } }
    if (st.finding === "*" && !r.f.length) { return false; }
    if (st.finding === "-" && r.f.length) { return false; }
    if (st.finding && st.finding !== "*" && st.finding !== "-" && r.f.indexOf(st.finding) < 0) { return false; }
    if (st.method && !r.a[st.method]) { return false; }
    if (st.ins !== null) { var v = insOf(r); if (v === null || v > st.ins) { return false; } }
    if (st.unreliable && !r.u.length) { return false; }
    if (st.wrong && r.ok !== false) { return false; }
    if (st.since && !r.sl) { return false; }
    return true;
  }
  function sortVal(r, key) {
    if (key === "ins") { return insOf(r); }
    if (key === "f" || key === "u") { return r[key].length || null; }
    if (key === "dup") { return r.dup || r.lk || null; }
    var v = r[key];
    return v === "" ? null : v;
  }
  function apply() {
    view = rows.filter(keep);
    if (st.sort) {
      var key = st.sort, sign = st.desc ? -1 : 1;
      view = view.map(function (r, i) { return [sortVal(r, key), i, r]; }).sort(function (a, b) {
        if (a[0] === null && b[0] === null) { return a[1] - b[1]; }
        if (a[0] === null) { return 1; }
        if (b[0] === null) { return -1; }
        if (a[0] < b[0]) { return -sign; }
        if (a[0] > b[0]) { return sign; }
        return a[1] - b[1];
      }).map(function (t) { return t[2]; });
    }
    st.page = Math.max(0, Math.min(st.page, Math.ceil(view.length / PAGE) - 1));
    draw();
  }
  function thumbCell(r) {
    var td = document.createElement("td");
    var img = document.createElement("img");
    img.width = 48; img.height = 48; img.alt = ""; img.className = "mini";
    var c = window.convlens;
    var u = c && c.thumbOf ? c.thumbOf(r.r) : null;
    if (u) { img.src = u; } else { img.className = "mini nothumb"; }
    img.title = r.p;
    td.appendChild(img);
    return td;
  }
  function draw() {
    var body = table.tBodies[0];
    body.textContent = "";
    var from = st.page * PAGE;
    view.slice(from, from + PAGE).forEach(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-row", String(r.r));
      tr.appendChild(thumbCell(r));
      var p = txt("td", r.p, "mono path"); p.title = r.p; tr.appendChild(p);
      tr.appendChild(txt("td", r.l + (r.s ? " · " + r.s : "")));
      tr.appendChild(txt("td", r.pr, r.ok === false ? "neg" : ""));
      tr.appendChild(txt("td", r.c == null ? "" : r.c.toFixed(3)));
      var f = document.createElement("td");
      r.f.forEach(function (k) { f.appendChild(txt("span", k, "chip kind")); });
      if (r.sg) { f.appendChild(txt("div", "suggested: " + r.sg, "hint")); }
      tr.appendChild(f);
      tr.appendChild(txt("td", r.ls == null ? "" : r.ls.toFixed(3)));
      tr.appendChild(txt("td", r.o == null ? "" : r.o.toFixed(3)));
      var d = document.createElement("td");
      if (r.dup) { d.appendChild(txt("div", "dup" + (r.g != null ? " #" + r.g : "") + ": " + r.dup, "mono")); }
      if (r.lk) { d.appendChild(txt("div", "leak: " + r.lk, "mono neg")); }
      tr.appendChild(d);
      var a = document.createElement("td");
      Object.keys(r.a).sort().forEach(function (m) {
        var v = r.a[m];
        var line = txt("div", m + " " + (v[0] == null ? "—" : v[0].toFixed(3)) + " / " + (v[1] == null ? "—" : v[1].toFixed(3)),
          "auc" + (m === st.method ? " sel" : "") + (m === r.b ? " best" : "") + (r.u.indexOf(m) >= 0 ? " unreliable" : ""));
        a.appendChild(line);
      });
      tr.appendChild(a);
      var u = document.createElement("td");
      r.u.forEach(function (m) { u.appendChild(txt("span", "✗ " + m, "badge bad")); });
      Object.keys(r.sa).forEach(function (m) { u.appendChild(txt("div", m + " ρ " + (r.sa[m] == null ? "—" : r.sa[m].toFixed(2)), "hint")); });
      tr.appendChild(u);
      if (table.querySelector("th[data-key=sl]")) { tr.appendChild(txt("td", r.sl, r.sl ? "news" : "")); }
      body.appendChild(tr);
    });
    var pages = Math.max(1, Math.ceil(view.length / PAGE));
    $("it-count").textContent = view.length + " of " + rows.length + " images" + (view.length > PAGE ? " · " + PAGE + " per page" : "")
      + (total > rows.length ? " · " + (total - rows.length) + " more images with no finding, map or change are only in the stored table" : "");
    $("it-page").textContent = "page " + (st.page + 1) + " of " + pages;
    $("it-prev").disabled = st.page <= 0;
    $("it-next").disabled = st.page >= pages - 1;
    Array.prototype.forEach.call(table.querySelectorAll("th[data-key]"), function (th) {
      th.classList.toggle("sorted", th.getAttribute("data-key") === st.sort);
      th.setAttribute("aria-sort", th.getAttribute("data-key") === st.sort ? (st.desc ? "descending" : "ascending") : "none");
    });
  }
  function readControls() {
    st.q = $("it-q").value.trim().toLowerCase();
    st.finding = $("it-finding").value;
    st.method = $("it-method").value;
    var ins = parseFloat($("it-ins").value);
    st.ins = isNaN(ins) ? null : ins;
    st.unreliable = $("it-unreliable").checked;
    st.wrong = $("it-wrong").checked;
    st.since = $("it-since") ? $("it-since").checked : false;
    st.page = 0;
    apply();
  }
  function setControls(s) {
    $("it-q").value = s.q || "";
    $("it-finding").value = s.finding || "";
    $("it-method").value = s.method || "";
    $("it-ins").value = s.ins_max == null ? "" : String(s.ins_max);
    $("it-unreliable").checked = !!s.unreliable;
    $("it-wrong").checked = !!s.wrong;
    if ($("it-since")) { $("it-since").checked = !!s.since; }
    if ($("it-method").value !== (s.method || "")) { $("it-method").value = ""; }
    st.sort = s.sort || null; st.desc = !!s.desc;
    readControls();
  }
  ["it-q", "it-finding", "it-method", "it-ins", "it-unreliable", "it-wrong", "it-since"].forEach(function (id) {
    var c = $(id);
    if (c) { c.addEventListener(c.tagName === "INPUT" && (c.type === "search" || c.type === "number") ? "input" : "change", readControls); }
  });
  $("it-reset").addEventListener("click", function () { setControls({}); });
  $("it-prev").addEventListener("click", function () { st.page -= 1; draw(); });
  $("it-next").addEventListener("click", function () { st.page += 1; draw(); });
  Array.prototype.forEach.call(table.querySelectorAll("th[data-key]"), function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      if (st.sort === key) { st.desc = !st.desc; } else { st.sort = key; st.desc = false; }
      apply();
    });
  });
  Array.prototype.forEach.call(document.querySelectorAll("button.preset"), function (b) {
    b.addEventListener("click", function () { setControls(D.presets[parseInt(b.getAttribute("data-preset"), 10)].state); });
  });
  apply();
  window.convlensTable = {
    rows: function () { return view.map(function (r) { return r.r; }); },
    state: function () { return JSON.parse(JSON.stringify(st)); },
    preset: function (i) { setControls(D.presets[i].state); },
    set: setControls
  };
})();
