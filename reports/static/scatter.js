/* convlens report: the feature-map scatter for every point of the dataset (a million and more).

   Data: <script type="application/json" id="cl-scatter-bin"> written by reports/scatter_data.py:
     {"n": N, "rows": null | base64 uint32 (the feature row of each shown point),
      "proj": {name: {"b64": base64 of N x 2 little-endian uint16 (x, y interleaved), "lo": [x, y], "hi": [x, y]}},
      "color": {name: {"b64": base64 of N uint8 / uint16 category codes, "bytes": 1 | 2}}}
   A coordinate decodes as lo + q * (hi - lo) / 65535 (error <= half a step); category names, counts, paths,
   labels and neighbours stay in report.js's points JSON (P).

   Drawing: WebGL. Zoomed in, every visible point is a GL point (positions uploaded once as normalised uint16,
   colours as uint8 RGBA). Zoomed out (more than DENSITY_AT points per screen pixel in view) a density image is
   drawn instead: points binned at screen resolution on the CPU, colour = mean colour of the bin, opacity =
   log(count), uploaded as one texture. Hover / click pick the nearest point on screen through a 256 x 256 grid
   index over the quantised coordinates. Without WebGL the same density / point images are drawn on a 2-d canvas.

   Mounted by report.js (ConvlensScatter.mount) with its helpers; every string is inserted with textContent. */
(function () {
  "use strict";
  var Q = 65535;
  var GRID = 256;                 // grid index cells per axis (cell = top 8 bits of the uint16 coordinate)
  var DENSITY_AT = 0.35;          // visible points per screen pixel above which the density view is drawn
  var PICK_PX = 8;                // hover / click radius in CSS pixels
  var GREY = [176, 176, 176];
  var LITTLE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

  function bytesOf(b64) {
    var bin = atob(b64 || "");
    var n = bin.length, out = new Uint8Array(n);
    for (var i = 0; i < n; i++) { out[i] = bin.charCodeAt(i); }
    return out;
  }
  function u16(bytes) {
    if (!LITTLE) { for (var i = 0; i + 1 < bytes.length; i += 2) { var t = bytes[i]; bytes[i] = bytes[i + 1]; bytes[i + 1] = t; } }
    return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length >> 1);
  }
  function u32(bytes) {
    if (!LITTLE) { for (var i = 0; i + 3 < bytes.length; i += 4) { var a = bytes[i], b = bytes[i + 1]; bytes[i] = bytes[i + 3]; bytes[i + 1] = bytes[i + 2]; bytes[i + 2] = b; bytes[i + 3] = a; } }
    return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >> 2);
  }
  function hexRGB(h) {
    var m = /^#?([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(h || "");
    return m ? [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)] : GREY.slice();
  }

  /* ---------------------------------------------------------------- decoded data */
  function decode(B) {
    var n = B.n;
    var data = { n: n, rows: B.rows ? u32(bytesOf(B.rows)) : null, proj: {}, color: {} };
    Object.keys(B.proj).forEach(function (name) {
      var s = B.proj[name];
      var lo = [+s.lo[0], +s.lo[1]], hi = [+s.hi[0], +s.hi[1]];
      data.proj[name] = { spec: s, q: null, lo: lo, hi: hi, range: [hi[0] - lo[0] || 1, hi[1] - lo[1] || 1], grid: null };
    });
    Object.keys(B.color).forEach(function (name) { data.color[name] = { spec: B.color[name], codes: null }; });
    return data;
  }
  function projQ(p, n) { if (!p.q) { p.q = u16(bytesOf(p.spec.b64)); if (p.q.length !== 2 * n) { throw new Error("scatter payload: bad coordinate length"); } p.spec = null; } return p.q; }
  function colorCodes(c, n) {
    if (!c.codes) { var b = bytesOf(c.spec.b64); c.codes = c.spec.bytes === 2 ? u16(b) : b; if (c.codes.length !== n) { throw new Error("scatter payload: bad colour length"); } c.spec = null; }
    return c.codes;
  }
  function buildGrid(q, n) {
    var start = new Int32Array(GRID * GRID + 1), order = new Uint32Array(n), i, c;
    var cell = new Uint16Array(n);
    for (i = 0; i < n; i++) { c = ((q[2 * i] >> 8) * GRID) + (q[2 * i + 1] >> 8); cell[i] = c; start[c + 1]++; }
    for (c = 0; c < GRID * GRID; c++) { start[c + 1] += start[c]; }
    var fill = start.slice(0, GRID * GRID);
    for (i = 0; i < n; i++) { order[fill[cell[i]]++] = i; }
    return { start: start, order: order };
  }

  /* ---------------------------------------------------------------- WebGL */
  var VS = "attribute vec2 a_q; attribute vec4 a_c; uniform vec2 u_lo; uniform vec2 u_range; uniform vec2 u_center;" +
    " uniform vec2 u_scale; uniform float u_size; varying vec4 v_c;" +
    " void main() { vec2 w = u_lo + a_q * u_range; gl_Position = vec4((w - u_center) * u_scale, 0.0, 1.0); gl_PointSize = u_size; v_c = a_c; }";
  var FS = "precision mediump float; varying vec4 v_c; uniform float u_alpha;" +
    " void main() { vec2 d = gl_PointCoord - 0.5; if (dot(d, d) > 0.25) { discard; } gl_FragColor = vec4(v_c.rgb, u_alpha); }";
  var VS_TEX = "attribute vec2 a_p; varying vec2 v_uv; void main() { v_uv = vec2(a_p.x * 0.5 + 0.5, 0.5 - a_p.y * 0.5); gl_Position = vec4(a_p, 0.0, 1.0); }";
  var FS_TEX = "precision mediump float; varying vec2 v_uv; uniform sampler2D u_tex; void main() { gl_FragColor = texture2D(u_tex, v_uv); }";

  function program(gl, vs, fs) {
    function sh(type, src) { var s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s); if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) { throw new Error(gl.getShaderInfoLog(s)); } return s; }
    var p = gl.createProgram();
    gl.attachShader(p, sh(gl.VERTEX_SHADER, vs)); gl.attachShader(p, sh(gl.FRAGMENT_SHADER, fs)); gl.linkProgram(p);
    if (!gl.getProgramParameter(p, gl.LINK_STATUS)) { throw new Error(gl.getProgramInfoLog(p)); }
    return p;
  }

  function mount(gd, P, api, H) {
    var t0 = performance.now();
    var el = document.getElementById("cl-scatter-bin");
    var data = decode(JSON.parse(el.textContent));
    el.textContent = "";  // the base64 text is not needed again
    var n = data.n;
    function rowOf(i) { return data.rows ? data.rows[i] : i; }
    var idxMap = null;
    function idxOf(row) {
      if (!data.rows) { return row >= 0 && row < n ? row : -1; }
      if (idxMap === null) { idxMap = new Map(); for (var i = 0; i < n; i++) { idxMap.set(data.rows[i], i); } }
      var v = idxMap.get(row); return v === undefined ? -1 : v;
    }
    var qpos = new Map();
    for (var qi = 0; qi < P.q.length; qi++) { qpos.set(P.q[qi], qi); }

    var projNames = Object.keys(data.proj), colorNames = Object.keys(data.color);
    var projSel = document.getElementById("cl-proj"), colorSel = document.getElementById("cl-color");
    colorNames.forEach(function (c) { var o = document.createElement("option"); o.value = c; o.textContent = c; colorSel.appendChild(o); });
    var proj = projNames[0], colorBy = colorNames.indexOf("label") >= 0 ? "label" : colorNames[0];
    if (colorBy !== undefined) { colorSel.value = colorBy; }
    var palette = P.palette.map(hexRGB);

    /* canvas + context */
    gd.textContent = "";
    gd.style.position = "relative";
    var canvas = document.createElement("canvas");
    canvas.className = "cl-gl";
    canvas.style.width = "100%"; canvas.style.height = "100%"; canvas.style.display = "block"; canvas.style.cursor = "crosshair";
    gd.appendChild(canvas);
    var gl = null;
    try { gl = canvas.getContext("webgl", { antialias: false, preserveDrawingBuffer: true, alpha: false }) || canvas.getContext("experimental-webgl"); } catch (e) { gl = null; }
    var ctx2d = gl ? null : canvas.getContext("2d");
    var status = document.createElement("div");
    status.className = "hint cl-scatter-status";
    status.style.cssText = "position:absolute;left:6px;bottom:4px;font-size:11px;background:rgba(255,255,255,.8);padding:1px 4px;pointer-events:none";
    gd.appendChild(status);
    var reset = document.createElement("button");
    reset.type = "button"; reset.textContent = "reset view";
    reset.style.cssText = "position:absolute;right:6px;top:4px;font-size:11px";
    gd.appendChild(reset);
    if (!gl) {
      var warn = H.text("p", "WebGL is not available in this browser: the map is drawn on a 2-d canvas (slower when zoomed in).", "hint");
      gd.parentNode.insertBefore(warn, gd);
    }

    var prog = null, progTex = null, bufQ = null, bufC = null, bufQuad = null, bufIdx = null, tex = null, loc = {}, extUint = null;
    if (gl) {
      prog = program(gl, VS, FS); progTex = program(gl, VS_TEX, FS_TEX);
      loc = { q: gl.getAttribLocation(prog, "a_q"), c: gl.getAttribLocation(prog, "a_c"), lo: gl.getUniformLocation(prog, "u_lo"),
              range: gl.getUniformLocation(prog, "u_range"), center: gl.getUniformLocation(prog, "u_center"),
              scale: gl.getUniformLocation(prog, "u_scale"), size: gl.getUniformLocation(prog, "u_size"),
              alpha: gl.getUniformLocation(prog, "u_alpha"), p: gl.getAttribLocation(progTex, "a_p"), tex: gl.getUniformLocation(progTex, "u_tex") };
      bufQ = gl.createBuffer(); bufC = gl.createBuffer(); bufQuad = gl.createBuffer(); bufIdx = gl.createBuffer();
      extUint = gl.getExtension("OES_element_index_uint");  // zoomed in: draw only the grid cells in view
      gl.bindBuffer(gl.ARRAY_BUFFER, bufQuad);
      gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
      tex = gl.createTexture();
      gl.bindTexture(gl.TEXTURE_2D, tex);
      gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST); gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
      gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE); gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
    }

    /* colours: N x RGBA uint8 */
    var rgba = new Uint8Array(4 * n);
    function setColors() {
      var codes = colorBy !== undefined ? colorCodes(data.color[colorBy], n) : null;
      for (var i = 0; i < n; i++) {
        var k = codes ? codes[i] : 0, c = k < palette.length ? palette[k] : GREY;
        rgba[4 * i] = c[0]; rgba[4 * i + 1] = c[1]; rgba[4 * i + 2] = c[2]; rgba[4 * i + 3] = 255;
      }
      if (gl) { gl.bindBuffer(gl.ARRAY_BUFFER, bufC); gl.bufferData(gl.ARRAY_BUFFER, rgba, gl.STATIC_DRAW); }
    }
    var cur = null;
    function setProj() {
      cur = data.proj[proj];
      var q = projQ(cur, n);
      if (!cur.grid) { cur.grid = buildGrid(q, n); }
      if (gl) {
        gl.bindBuffer(gl.ARRAY_BUFFER, bufQ); gl.bufferData(gl.ARRAY_BUFFER, q, gl.STATIC_DRAW);
        if (extUint) { gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, bufIdx); gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, cur.grid.order, gl.STATIC_DRAW); }
      }
    }

    /* view: centre (world units) and pixels per world unit (same for x and y: an honest aspect ratio) */
    var view = { cx: 0, cy: 0, ppw: 1 }, css = { w: 1, h: 1 }, dpr = 1;
    function resize() {
      var r = canvas.getBoundingClientRect();
      dpr = window.devicePixelRatio || 1;
      css.w = Math.max(1, r.width); css.h = Math.max(1, r.height);
      canvas.width = Math.round(css.w * dpr); canvas.height = Math.round(css.h * dpr);
    }
    function fit() {
      view.cx = cur.lo[0] + cur.range[0] / 2; view.cy = cur.lo[1] + cur.range[1] / 2;
      view.ppw = 0.94 * Math.min(css.w / cur.range[0], css.h / cur.range[1]);
    }
    function worldOf(i, out) { var q = cur.q; out[0] = cur.lo[0] + q[2 * i] / Q * cur.range[0]; out[1] = cur.lo[1] + q[2 * i + 1] / Q * cur.range[1]; return out; }
    function toScreen(wx, wy) { return [css.w / 2 + (wx - view.cx) * view.ppw, css.h / 2 - (wy - view.cy) * view.ppw]; }
    function toWorld(sx, sy) { return [view.cx + (sx - css.w / 2) / view.ppw, view.cy - (sy - css.h / 2) / view.ppw]; }
    function qOfWorld(wx, wy) { return [(wx - cur.lo[0]) / cur.range[0] * Q, (wy - cur.lo[1]) / cur.range[1] * Q]; }
    function cellRange(wx0, wy0, wx1, wy1) {
      var a = qOfWorld(wx0, wy0), b = qOfWorld(wx1, wy1);
      function c(v) { return Math.max(0, Math.min(GRID - 1, Math.floor(v / 256))); }
      return [c(Math.min(a[0], b[0])), c(Math.max(a[0], b[0])), c(Math.min(a[1], b[1])), c(Math.max(a[1], b[1]))];
    }
    function viewCells(marginPx) {
      var m = marginPx || 0, tl = toWorld(-m, -m), br = toWorld(css.w + m, css.h + m);
      return cellRange(tl[0], br[1], br[0], tl[1]);
    }
    function visibleCount() {
      var r = viewCells(0), s = cur.grid.start, total = 0;
      for (var cx = r[0]; cx <= r[1]; cx++) { total += s[cx * GRID + r[3] + 1] - s[cx * GRID + r[2]]; }
      return total;
    }

    /* density image: one bin per `bin` device pixels */
    var dens = null;
    function densityImage(bin) {
      var W = Math.max(1, Math.ceil(canvas.width / bin)), Hh = Math.max(1, Math.ceil(canvas.height / bin));
      if (!dens || dens.W !== W || dens.H !== Hh) { dens = { W: W, H: Hh, acc: new Float32Array(W * Hh * 4), img: new Uint8Array(W * Hh * 4) }; }
      var acc = dens.acc, img = dens.img, q = cur.q;
      acc.fill(0);
      var k = view.ppw * dpr / bin, ox = W / 2 - view.cx * k, oy = Hh / 2 + view.cy * k;
      var ax = cur.range[0] / Q * k, bx = cur.lo[0] * k + ox, ay = -cur.range[1] / Q * k, by = -cur.lo[1] * k + oy;
      for (var i = 0; i < n; i++) {
        var x = (q[2 * i] * ax + bx) | 0, y = (q[2 * i + 1] * ay + by) | 0;
        if (x < 0 || y < 0 || x >= W || y >= Hh) { continue; }
        var j = (y * W + x) * 4;
        acc[j] += rgba[4 * i]; acc[j + 1] += rgba[4 * i + 1]; acc[j + 2] += rgba[4 * i + 2]; acc[j + 3] += 1;
      }
      var maxc = 1, m;
      for (m = 3; m < acc.length; m += 4) { if (acc[m] > maxc) { maxc = acc[m]; } }
      var lmax = Math.log(1 + maxc);
      for (m = 0; m < acc.length; m += 4) {
        var cnt = acc[m + 3];
        if (cnt === 0) { img[m] = 250; img[m + 1] = 250; img[m + 2] = 250; img[m + 3] = 255; continue; }
        var a = 0.25 + 0.75 * Math.log(1 + cnt) / lmax, inv = 1 / cnt;
        img[m] = 250 * (1 - a) + acc[m] * inv * a; img[m + 1] = 250 * (1 - a) + acc[m + 1] * inv * a;
        img[m + 2] = 250 * (1 - a) + acc[m + 2] * inv * a; img[m + 3] = 255;
      }
      return dens;
    }

    var mode = "points", frames = 0, lastMs = 0, pending = false, firstPaint = null, densityAt = DENSITY_AT;
    function draw() {
      pending = false;
      var t = performance.now();
      var vis = visibleCount(), perPx = vis / (css.w * css.h);
      mode = perPx > densityAt ? "density" : "points";
      var size = Math.max(2, Math.min(7, 0.5 * Math.sqrt(1 / Math.max(perPx, 1e-6)))) * dpr;
      if (gl) {
        gl.viewport(0, 0, canvas.width, canvas.height);
        gl.clearColor(250 / 255, 250 / 255, 250 / 255, 1); gl.clear(gl.COLOR_BUFFER_BIT);
        if (mode === "density") {
          var d = densityImage(Math.max(1, Math.round(dpr)));
          gl.useProgram(progTex);
          gl.disableVertexAttribArray(loc.c); gl.disableVertexAttribArray(loc.q);
          gl.activeTexture(gl.TEXTURE0); gl.bindTexture(gl.TEXTURE_2D, tex);
          gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
          gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, d.W, d.H, 0, gl.RGBA, gl.UNSIGNED_BYTE, d.img);
          gl.uniform1i(loc.tex, 0);
          gl.bindBuffer(gl.ARRAY_BUFFER, bufQuad); gl.enableVertexAttribArray(loc.p); gl.vertexAttribPointer(loc.p, 2, gl.FLOAT, false, 0, 0);
          gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
          gl.disableVertexAttribArray(loc.p);
        } else {
          gl.useProgram(prog);
          gl.enable(gl.BLEND); gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
          gl.bindBuffer(gl.ARRAY_BUFFER, bufQ); gl.enableVertexAttribArray(loc.q); gl.vertexAttribPointer(loc.q, 2, gl.UNSIGNED_SHORT, true, 0, 0);
          gl.bindBuffer(gl.ARRAY_BUFFER, bufC); gl.enableVertexAttribArray(loc.c); gl.vertexAttribPointer(loc.c, 4, gl.UNSIGNED_BYTE, true, 0, 0);
          gl.uniform2f(loc.lo, cur.lo[0], cur.lo[1]); gl.uniform2f(loc.range, cur.range[0], cur.range[1]);
          gl.uniform2f(loc.center, view.cx, view.cy); gl.uniform2f(loc.scale, 2 * view.ppw / css.w, 2 * view.ppw / css.h);
          gl.uniform1f(loc.size, size); gl.uniform1f(loc.alpha, n > 50000 ? 0.75 : 0.9);
          if (extUint && vis < 0.6 * n) {  // one draw per grid column in view, over the cell-sorted indices
            var r = viewCells(size), st = cur.grid.start;
            gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, bufIdx);
            for (var cx = r[0]; cx <= r[1]; cx++) {
              var a = st[cx * GRID + r[2]], b = st[cx * GRID + r[3] + 1];
              if (b > a) { gl.drawElements(gl.POINTS, b - a, gl.UNSIGNED_INT, a * 4); }
            }
          } else { gl.drawArrays(gl.POINTS, 0, n); }
          gl.disable(gl.BLEND);
        }
      } else {
        var dd = densityImage(mode === "density" ? 2 : 1);
        var id = ctx2d.createImageData(dd.W, dd.H); id.data.set(dd.img);
        ctx2d.imageSmoothingEnabled = false;
        if (dd.W === canvas.width) { ctx2d.putImageData(id, 0, 0); } else {
          var off = document.createElement("canvas"); off.width = dd.W; off.height = dd.H; off.getContext("2d").putImageData(id, 0, 0);
          ctx2d.drawImage(off, 0, 0, canvas.width, canvas.height);
        }
      }
      lastMs = performance.now() - t; frames++;
      status.textContent = n.toLocaleString() + " points · " + vis.toLocaleString() + " in view · " + (mode === "density" ? "density view (zoom in for points)" : "points");
      if (firstPaint === null) { firstPaint = performance.now(); api.firstPaintMs = firstPaint; api.mountMs = firstPaint - t0; }
      api.mode = mode; api.lastFrameMs = lastMs; api.frames = frames;
    }
    function requestDraw() { if (!pending) { pending = true; requestAnimationFrame(draw); } }

    /* picking: nearest point within PICK_PX CSS pixels of (sx, sy) */
    var tmp = [0, 0];
    function pick(sx, sy) {
      var r = PICK_PX / view.ppw, w = toWorld(sx, sy), cr = cellRange(w[0] - r, w[1] - r, w[0] + r, w[1] + r);
      var s = cur.grid.start, order = cur.grid.order, best = -1, bestD = PICK_PX * PICK_PX, scanned = 0;
      for (var cx = cr[0]; cx <= cr[1]; cx++) {
        for (var j = s[cx * GRID + cr[2]], end = s[cx * GRID + cr[3] + 1]; j < end; j++) {
          var i = order[j];
          worldOf(i, tmp);
          var dx = (tmp[0] - w[0]) * view.ppw, dy = (tmp[1] - w[1]) * view.ppw, dd = dx * dx + dy * dy;
          if (dd <= bestD) { bestD = dd; best = i; }
          if (++scanned > 400000) { return best; }
        }
      }
      return best;
    }

    /* hover box, neighbour panel (same markup as report.js) */
    var hoverBox = document.getElementById("cl-hover"), hoverImg = document.getElementById("cl-hover-img"), hoverText = document.getElementById("cl-hover-text");
    function showHover(row) {
      hoverBox.setAttribute("data-row", String(row));
      var u = H.thumbOf(row);
      if (u) { hoverImg.src = u; hoverImg.style.visibility = "visible"; } else { hoverImg.removeAttribute("src"); hoverImg.style.visibility = "hidden"; }
      hoverText.textContent = "";
      hoverText.appendChild(H.text("div", "label: " + (P.label[row] || "(none)")));
      if (P.pred[row]) { hoverText.appendChild(H.text("div", "prediction: " + P.pred[row])); }
      hoverText.appendChild(H.text("div", P.path[row], "path"));
      if (!u) { hoverText.appendChild(H.text("div", "(no thumbnail embedded: sampled out or unreadable)", "hint")); }
    }
    function figure(row, caption) {
      var fig = document.createElement("figure");
      fig.className = "th nb"; fig.setAttribute("data-row", String(row));
      var img = document.createElement("img");
      img.width = 80; img.height = 80; img.alt = "";
      var u = H.thumbOf(row);
      if (u) { img.src = u; } else { img.className = "nothumb"; }
      img.title = P.path[row] + "\n" + H.describe(row);
      fig.appendChild(img); fig.appendChild(H.text("figcaption", caption));
      fig.addEventListener("click", function () { showNeighbours(row); showHover(row); });
      return fig;
    }
    function showNeighbours(row) {
      var panel = document.getElementById("cl-neighbours");
      panel.setAttribute("data-row", String(row)); panel.textContent = "";
      var head = document.createElement("div"); head.className = "nb-head";
      head.appendChild(figure(row, H.describe(row))); head.appendChild(H.text("div", P.path[row], "mono"));
      panel.appendChild(head);
      var q = qpos.get(row);
      if (q === undefined || !P.k) {
        panel.appendChild(H.text("p", "Neighbours were not embedded for this point (the report samples neighbour queries above its limit).", "hint"));
        return;
      }
      [["Feature space (" + P.knn_source + ")", P.nf, "feature"], ["Pixel space (" + (P.pix_source || "exact L2 on 16×16 RGB thumbnails") + ")", P.np, "pixel"]].forEach(function (spec) {
        var rowEl = document.createElement("div"); rowEl.className = "nb-row"; rowEl.setAttribute("data-space", spec[2]);
        rowEl.appendChild(H.text("h4", spec[0]));
        var gal = document.createElement("div"); gal.className = "gallery";
        for (var j = 0; j < P.k; j++) { var nb = spec[1][q * P.k + j]; if (nb === undefined || nb < 0) { continue; } gal.appendChild(figure(nb, (j + 1) + ". " + H.describe(nb))); }
        rowEl.appendChild(gal); panel.appendChild(rowEl);
      });
    }
    function legend(name) {
      var box = document.getElementById("cl-legend"); box.textContent = "";
      var c = P.color[name];
      if (!c) { return; }
      box.appendChild(H.text("div", "colour: " + name, "legend-title"));
      for (var k = 0; k < c.cats.length && k < P.palette.length; k++) {
        var item = document.createElement("div"); item.className = "legend-item";
        var sw = document.createElement("span"); sw.className = "swatch"; sw.style.background = P.palette[k];
        item.appendChild(sw); item.appendChild(H.text("span", c.cats[k] + " (" + c.counts[k] + ")")); box.appendChild(item);
      }
      if (c.cats.length > P.palette.length) { box.appendChild(H.text("div", "+ " + (c.cats.length - P.palette.length) + " more (grey)", "legend-more")); }
    }

    /* interaction */
    function local(ev) { var r = canvas.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; }
    var drag = null, hoverPending = null;
    canvas.addEventListener("wheel", function (ev) {
      ev.preventDefault();
      var p = local(ev), before = toWorld(p[0], p[1]);
      view.ppw *= Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015));
      var after = toWorld(p[0], p[1]);
      view.cx += before[0] - after[0]; view.cy += before[1] - after[1];
      requestDraw();
    }, { passive: false });
    canvas.addEventListener("mousedown", function (ev) { if (ev.button === 0) { var p = local(ev); drag = { x: p[0], y: p[1], cx: view.cx, cy: view.cy, moved: false }; } });
    window.addEventListener("mouseup", function (ev) {
      if (!drag) { return; }
      var was = drag; drag = null;
      if (!was.moved && ev.target === canvas) {
        var p = local(ev), i = pick(p[0], p[1]);
        if (i >= 0) { var row = rowOf(i); showHover(row); showNeighbours(row); }
      }
    });
    canvas.addEventListener("mousemove", function (ev) {
      var p = local(ev);
      if (drag) {
        if (Math.abs(p[0] - drag.x) + Math.abs(p[1] - drag.y) > 3) { drag.moved = true; }
        if (drag.moved) { view.cx = drag.cx - (p[0] - drag.x) / view.ppw; view.cy = drag.cy + (p[1] - drag.y) / view.ppw; requestDraw(); }
        return;
      }
      if (hoverPending === null) {
        hoverPending = p;
        requestAnimationFrame(function () { var h = hoverPending; hoverPending = null; var i = pick(h[0], h[1]); if (i >= 0) { showHover(rowOf(i)); } });
      } else { hoverPending = p; }
    });
    canvas.addEventListener("dblclick", function () { fit(); requestDraw(); });
    reset.addEventListener("click", function () { fit(); requestDraw(); });
    colorSel.addEventListener("change", function () { colorBy = colorSel.value; setColors(); legend(colorBy); requestDraw(); });
    projSel.addEventListener("change", function () { proj = projSel.value; setProj(); fit(); requestDraw(); });
    window.addEventListener("resize", function () { resize(); requestDraw(); });

    function pointPixel(row) {
      var i = idxOf(row);
      if (i < 0) { return null; }
      var r = canvas.getBoundingClientRect(), s = toScreen.apply(null, worldOf(i, [0, 0]));
      if (s[0] < 0 || s[1] < 0 || s[0] > css.w || s[1] > css.h) { return null; }
      return { x: r.left + s[0], y: r.top + s[1] };
    }
    /* tests and power users: decoded coordinates of every shown point of a projection, as world units */
    function coords(name) {
      var p = data.proj[name || proj], q = projQ(p, n), out = new Float64Array(2 * n);
      for (var i = 0; i < n; i++) { out[2 * i] = p.lo[0] + q[2 * i] / Q * p.range[0]; out[2 * i + 1] = p.lo[1] + q[2 * i + 1] / Q * p.range[1]; }
      return out;
    }
    var px1 = new Uint8Array(4);
    function timedDraw() {  // draw one frame and wait until it is rendered (readPixels): wall ms of the frame
      var t = performance.now();
      draw();
      if (gl) { gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, px1); }
      return { mode: mode, ms: performance.now() - t };
    }
    function zoom(factor, sx, sy) {  // programmatic zoom around a CSS-pixel point (default: the centre)
      var px = sx === undefined ? css.w / 2 : sx, py = sy === undefined ? css.h / 2 : sy, before = toWorld(px, py);
      view.ppw *= factor;
      var after = toWorld(px, py);
      view.cx += before[0] - after[0]; view.cy += before[1] - after[1];
      return timedDraw();
    }
    function pan(dx, dy) { view.cx -= dx / view.ppw; view.cy += dy / view.ppw; return timedDraw(); }

    api.gd = gd; api.rowOf = rowOf; api.idxOf = idxOf; api.showHover = showHover; api.showNeighbours = showNeighbours;
    api.pointPixel = pointPixel; api.points = P; api.renderer = gl ? "webgl" : "canvas2d";
    api.scatter = { coords: coords, names: projNames, n: n, zoom: zoom, pan: pan, pick: function (sx, sy) { var i = pick(sx, sy); return i < 0 ? -1 : rowOf(i); },
                    view: function () { return { cx: view.cx, cy: view.cy, ppw: view.ppw, w: css.w, h: css.h }; },
                    fit: function () { fit(); return timedDraw(); },
                    densityAt: function (v) { densityAt = v === null || v === undefined ? DENSITY_AT : +v; return densityAt; } };

    if (!n || !projNames.length) { status.textContent = "no points"; api.ready = true; return; }
    resize(); setColors(); setProj(); fit(); legend(colorBy);
    draw();
    api.ready = true;
  }

  function mountSafe(gd, P, api, H) {
    try { mount(gd, P, api, H); } catch (e) {
      gd.textContent = "";
      gd.appendChild(H.text("p", "The map could not be drawn: " + (e && e.message ? e.message : String(e)), "error"));
      api.error = String(e); api.ready = true;
      if (window.console) { window.console.error(e); }
    }
  }

  window.ConvlensScatter = { mount: mountSafe };
})();
