/* medseg case viewer: axial, coronal and sagittal views of a scan with its label map.
 * Offline, no dependencies. The data script (viewer/volume.js) calls medsegVolume(data).
 * Display space: x, y, z index the voxel axes nearest to patient R, A, S (a permutation and
 * flips of the voxel grid, never resampled). Views are radiological: patient right on the
 * screen's left, anterior up in axial views, superior up otherwise, anterior left in sagittal.
 */
(function () {
  'use strict';
  var root = document.getElementById('medseg-viewer');
  if (!root) { return; }
  // plane: the fixed display axis, the axis along canvas columns and along canvas rows
  // (both run backwards: column 0 is the largest x/y index, row 0 the largest y/z index)
  var PLANES = {
    axial: {fixed: 2, col: 0, row: 1, sides: ['R', 'L', 'A', 'P']},
    coronal: {fixed: 1, col: 0, row: 2, sides: ['R', 'L', 'S', 'I']},
    sagittal: {fixed: 0, col: 1, row: 2, sides: ['A', 'P', 'S', 'I']}
  };
  var NAMES = ['axial', 'coronal', 'sagittal'];
  var V = null;  // the volume
  var S = {cursor: [0, 0, 0], level: 0, width: 1, opacity: 0.4, visible: {}, active: 'axial'};
  var views = {};
  var colorLut = null;

  function b64bytes(text) {
    var bin = atob(text), n = bin.length, out = new Uint8Array(n);
    for (var i = 0; i < n; i++) { out[i] = bin.charCodeAt(i); }
    return out;
  }

  function inflate(bytes) {
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
    return new Response(stream).arrayBuffer();
  }

  // base64 → inflated bytes: the browser's own decoder through a data: URL, else atob
  function unpack(text) {
    return fetch('data:application/octet-stream;base64,' + text).then(function (r) {
      return new Response(r.body.pipeThrough(new DecompressionStream('deflate'))).arrayBuffer();
    }).catch(function () { return inflate(b64bytes(text)); });
  }

  function el(tag, attrs, parent) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') { e.textContent = attrs[k]; } else { e.setAttribute(k, attrs[k]); }
    });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  // offset of display point p = base + sum(stride[a] * p[a])
  function geometry(d) {
    var shape = d.shape, dataStride = [shape[1] * shape[2], shape[2], 1];
    var n = [0, 0, 0], stride = [0, 0, 0], base = 0;
    for (var a = 0; a < 3; a++) {
      var ax = d.ras_axes[a];
      n[a] = shape[ax];
      if (d.ras_flips[a] > 0) { stride[a] = dataStride[ax]; } else {
        stride[a] = -dataStride[ax];
        base += (shape[ax] - 1) * dataStride[ax];
      }
    }
    return {n: n, stride: stride, base: base};
  }

  function offsetOf(p) {
    return V.g.base + V.g.stride[0] * p[0] + V.g.stride[1] * p[1] + V.g.stride[2] * p[2];
  }

  // the voxel of labels.nii.gz under display point p
  function voxelOf(p) {
    var idx = [0, 0, 0];
    for (var a = 0; a < 3; a++) {
      var ax = V.d.ras_axes[a], q = V.d.ras_flips[a] > 0 ? p[a] : V.d.shape[ax] - 1 - p[a];
      idx[ax] = ax < 2 ? q * V.d.factor : q;
    }
    return idx;
  }

  function buildLut() {
    colorLut = new Uint8Array(4 * 65536);
    V.d.labels.forEach(function (lab) {
      if (lab.value < 65536 && S.visible[lab.value] !== false) {
        colorLut.set([lab.color[0], lab.color[1], lab.color[2], 1], 4 * lab.value);
      }
    });
  }

  function render(name) {
    var v = views[name], P = PLANES[name], g = V.g;
    var nc = g.n[P.col], nr = g.n[P.row];
    var img = v.data, px = img.data;
    var lo = (S.level - S.width / 2 - V.d.offset) / V.d.scale;
    var k = 255 / (S.width / V.d.scale);
    var alpha = S.opacity, keep = 1 - alpha;
    var rowStart = g.base + g.stride[P.fixed] * S.cursor[P.fixed];
    var sc = g.stride[P.col], sr = g.stride[P.row];
    var image = V.image, labels = V.labels, lut = colorLut, hasImage = V.d.has_image;
    var o = 0;
    for (var r = 0; r < nr; r++) {
      var off = rowStart + sr * (nr - 1 - r) + sc * (nc - 1);
      for (var c = 0; c < nc; c++, off -= sc, o += 4) {
        var grey = 0;
        if (hasImage) {
          grey = (image[off] - lo) * k;
          grey = grey < 0 ? 0 : (grey > 255 ? 255 : grey);
        }
        var lab = labels[off] * 4;
        if (lab && lut[lab + 3]) {
          px[o] = keep * grey + alpha * lut[lab];
          px[o + 1] = keep * grey + alpha * lut[lab + 1];
          px[o + 2] = keep * grey + alpha * lut[lab + 2];
        } else {
          px[o] = px[o + 1] = px[o + 2] = grey;
        }
        px[o + 3] = 255;
      }
    }
    v.ctx.putImageData(img, 0, 0);
    drawCross(name);
    v.slider.value = S.cursor[P.fixed];
    v.label.textContent = name + ' ' + (S.cursor[P.fixed] + 1) + ' / ' + g.n[P.fixed];
  }

  function drawCross(name) {
    var v = views[name], P = PLANES[name], g = V.g, ui = v.ui, ctx = v.uictx;
    ctx.clearRect(0, 0, ui.width, ui.height);
    var x = (g.n[P.col] - 1 - S.cursor[P.col] + 0.5) / g.n[P.col] * ui.width;
    var y = (g.n[P.row] - 1 - S.cursor[P.row] + 0.5) / g.n[P.row] * ui.height;
    ctx.strokeStyle = 'rgba(80,200,255,0.7)';
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(Math.round(x) + 0.5, 0); ctx.lineTo(Math.round(x) + 0.5, ui.height);
    ctx.moveTo(0, Math.round(y) + 0.5); ctx.lineTo(ui.width, Math.round(y) + 0.5);
    ctx.stroke();
  }

  function renderAll() { NAMES.forEach(render); }

  function setSlice(name, value) {
    var a = PLANES[name].fixed;
    S.cursor[a] = Math.max(0, Math.min(V.g.n[a] - 1, value | 0));
    renderAll();
  }

  function pointAt(name, ev) {
    var v = views[name], P = PLANES[name], rect = v.canvas.getBoundingClientRect();
    var c = Math.floor((ev.clientX - rect.left) / rect.width * V.g.n[P.col]);
    var r = Math.floor((ev.clientY - rect.top) / rect.height * V.g.n[P.row]);
    if (c < 0 || r < 0 || c >= V.g.n[P.col] || r >= V.g.n[P.row]) { return null; }
    var p = S.cursor.slice();
    p[P.col] = V.g.n[P.col] - 1 - c;
    p[P.row] = V.g.n[P.row] - 1 - r;
    return p;
  }

  function describe(p) {
    var off = offsetOf(p), lab = V.labels[off], name = lab ? 'label ' + lab : 'background';
    V.d.labels.forEach(function (l) { if (l.value === lab) { name = l.name; } });
    var value = V.image[off] * V.d.scale + V.d.offset;
    var text = 'voxel (' + voxelOf(p).join(', ') + ')';
    if (V.d.has_image) { text += '  value ' + (V.d.scale === 1 ? value : value.toPrecision(5)); }
    return text + '  ' + name + (lab ? ' (' + lab + ')' : '');
  }

  function setWindow(level, width) {
    S.level = level; S.width = Math.max(width, 1e-6 * Math.abs(V.d.scale));
    root.querySelector('.mv-window').textContent =
      'window L ' + S.level.toPrecision(4) + ' W ' + S.width.toPrecision(4);
    renderAll();
  }

  function makeView(name, box) {
    var P = PLANES[name], g = V.g, sp = V.spacing;
    var nc = g.n[P.col], nr = g.n[P.row];
    var wrap = el('div', {'class': 'mv-view', id: 'mv-' + name, tabindex: '0'}, box);
    var label = el('div', {'class': 'mv-title'}, wrap);
    var stage = el('div', {'class': 'mv-stage'}, wrap);
    var canvas = el('canvas', {'class': 'mv-img', width: nc, height: nr}, stage);
    var mmW = nc * sp[P.col], mmH = nr * sp[P.row], size = 340 / Math.max(mmW, mmH);
    var cssW = Math.max(1, Math.round(mmW * size)), cssH = Math.max(1, Math.round(mmH * size));
    stage.style.width = cssW + 'px'; stage.style.height = cssH + 'px';
    var ui = el('canvas', {'class': 'mv-ui', width: cssW, height: cssH}, stage);
    P.sides.forEach(function (s, i) {
      el('span', {'class': 'mv-side mv-side-' + ['l', 'r', 't', 'b'][i], text: s}, stage);
    });
    var slider = el('input', {type: 'range', min: 0, max: g.n[P.fixed] - 1, step: 1, 'class': 'mv-slider'}, wrap);
    var ctx = canvas.getContext('2d');
    views[name] = {wrap: wrap, canvas: canvas, ctx: ctx, ui: ui, uictx: ui.getContext('2d'),
      data: ctx.createImageData(nc, nr), slider: slider, label: label};
    slider.addEventListener('input', function () { setSlice(name, +slider.value); });
    wrap.addEventListener('wheel', function (ev) {
      ev.preventDefault();
      setSlice(name, S.cursor[P.fixed] + (ev.deltaY > 0 ? -1 : 1));
    }, {passive: false});
    wrap.addEventListener('keydown', function (ev) {
      var step = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10}[ev.key];
      if (step) { ev.preventDefault(); setSlice(name, S.cursor[P.fixed] + step); }
    });
    var drag = null;
    stage.addEventListener('contextmenu', function (ev) { ev.preventDefault(); });
    stage.addEventListener('mousedown', function (ev) {
      wrap.focus();
      S.active = name;
      if (ev.button === 2 || ev.shiftKey) {
        drag = {x: ev.clientX, y: ev.clientY, level: S.level, width: S.width};
      } else {
        var p = pointAt(name, ev);
        if (p) { S.cursor = p; renderAll(); }
        drag = {cross: true};
      }
      ev.preventDefault();
    });
    window.addEventListener('mouseup', function () { drag = null; });
    stage.addEventListener('mousemove', function (ev) {
      var p = pointAt(name, ev);
      if (p) { root.querySelector('.mv-info').textContent = describe(p); }
      if (!drag) { return; }
      if (drag.cross) {
        if (p) { S.cursor = p; renderAll(); }
      } else {
        var unit = Math.max(drag.width, 1) / 200;
        setWindow(drag.level - (ev.clientY - drag.y) * unit, drag.width + (ev.clientX - drag.x) * unit);
      }
    });
  }

  function controls(box) {
    var bar = el('div', {'class': 'mv-controls'}, box);
    el('span', {'class': 'mv-caption', text: 'window'}, bar);
    V.d.windows.forEach(function (w) {
      var b = el('button', {type: 'button', 'class': 'mv-preset', 'data-window': w.name, text: w.name}, bar);
      b.addEventListener('click', function () { setWindow(w.level, w.width); });
    });
    el('span', {'class': 'mv-window'}, bar);
    var labs = el('div', {'class': 'mv-labels'}, box);
    el('span', {'class': 'mv-caption', text: 'labels'}, labs);
    V.d.labels.forEach(function (lab) {
      var item = el('label', {'class': 'mv-label'}, labs);
      var cb = el('input', {type: 'checkbox', 'data-label': lab.value}, item);
      cb.checked = true;
      el('span', {'class': 'swatch', style: 'background:rgb(' + lab.color.join(',') + ')'}, item);
      item.appendChild(document.createTextNode(lab.name));
      cb.addEventListener('change', function () {
        S.visible[lab.value] = cb.checked; buildLut(); renderAll();
      });
    });
    var op = el('label', {'class': 'mv-label'}, labs);
    op.appendChild(document.createTextNode('opacity '));
    var range = el('input', {type: 'range', min: 0, max: 100, value: Math.round(S.opacity * 100),
      'class': 'mv-opacity'}, op);
    range.addEventListener('input', function () { S.opacity = range.value / 100; renderAll(); });
  }

  function start(d, image, labels) {
    V = {d: d, image: image, labels: labels, g: geometry(d), spacing: [0, 0, 0]};
    for (var a = 0; a < 3; a++) { V.spacing[a] = d.spacing[d.ras_axes[a]]; }
    S.cursor = V.g.n.map(function (n) { return n >> 1; });
    root.textContent = '';
    if (d.factor > 1) {
      el('div', {'class': 'mv-note', text: 'shown downsampled in-plane by a factor of ' + d.factor +
        ' (every ' + d.factor + 'th voxel along i and j of the ' + d.full_shape.join(' x ') +
        ' grid); voxel indices refer to the full grid'}, root);
    }
    controls(root);
    var box = el('div', {'class': 'mv-views'}, root);
    NAMES.forEach(function (n) { makeView(n, box); });
    el('div', {'class': 'mv-info', text: 'hover a view for the voxel under the cursor'}, root);
    buildLut();
    var w = d.windows[0];
    setWindow(w.level, w.width);
    window.medsegViewer = {
      state: S, volume: V, planes: PLANES, render: renderAll, setSlice: setSlice, setWindow: setWindow,
      voxelOf: voxelOf, describe: describe
    };
    root.setAttribute('data-ready', '1');
    root.setAttribute('data-ready-ms', String(Math.round(performance.now())));
  }

  window.medsegVolume = function (d) {
    root.setAttribute('data-parsed-ms', String(Math.round(performance.now())));  // the data script has run
    var Img = Int16Array, Lab = d.label_dtype === 'uint16' ? Uint16Array : Uint8Array;
    Promise.all([unpack(d.image_data), unpack(d.label_data)]).then(function (bufs) {
      delete d.image_data; delete d.label_data;
      root.setAttribute('data-decoded-ms', String(Math.round(performance.now())));
      start(d, new Img(bufs[0]), new Lab(bufs[1]));
    }).catch(function (err) {
      root.textContent = 'the viewer could not read this case: ' + err;
      root.setAttribute('data-error', String(err));
    });
  };
})();
