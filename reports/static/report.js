/* convlens report: lazy thumbnails, WebGL feature-map scatter with hover / click neighbours.
   All data comes from the JSON script elements; every string is inserted with textContent (never as HTML). */
(function () {
  "use strict";
  var pointsEl = document.getElementById("cl-points");
  var thumbsEl = document.getElementById("cl-thumbs");
  var P = JSON.parse(pointsEl.textContent);
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
  var api = { ready: false, fill: fill };
  window.convlens = api;
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
    [["Feature space (" + P.knn_source + ")", P.nf, "feature"], ["Pixel space (exact L2 on 16×16 RGB thumbnails)", P.np, "pixel"]].forEach(function (spec) {
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
