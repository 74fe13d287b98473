/* medseg verdicts: accept / needs correction / reject and a note per case, kept in the browser
 * (localStorage, per batch), with progress, a verdict filter and a review.json download on the index.
 * The batch's identity comes from report/batch.js (window.MEDSEG_BATCH).
 */
(function () {
  'use strict';
  if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', main); } else { main(); }
  function main() {
  var B = window.MEDSEG_BATCH;
  if (!B) { return; }
  var VERDICTS = [['accept', 'accept'], ['needs-correction', 'needs correction'], ['reject', 'reject']];
  var REVIEWER = 'medseg.reviewer';
  function key(caseId) { return 'medseg.review/' + B.batch_id + '/' + caseId; }
  function read(caseId) {
    try { return JSON.parse(window.localStorage.getItem(key(caseId)) || 'null'); } catch (e) { return null; }
  }
  function write(caseId, record) { window.localStorage.setItem(key(caseId), JSON.stringify(record)); }
  function el(tag, attrs, parent) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') { e.textContent = attrs[k]; } else { e.setAttribute(k, attrs[k]); }
    });
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function reviewerBox(parent) {
    var lab = el('label', {text: 'reviewer '}, parent);
    var input = el('input', {type: 'text', 'class': 'mv-reviewer', placeholder: 'your name'}, lab);
    input.value = window.localStorage.getItem(REVIEWER) || '';
    input.addEventListener('input', function () { window.localStorage.setItem(REVIEWER, input.value.trim()); });
    return input;
  }

  // a case page: the verdict panel
  var panel = document.getElementById('medseg-verdict');
  if (panel) {
    var caseId = panel.getAttribute('data-case');
    var rec = read(caseId) || {verdict: null, note: ''};
    el('strong', {text: 'verdict '}, panel);
    var buttons = VERDICTS.map(function (v) {
      var b = el('button', {type: 'button', 'data-verdict': v[0], text: v[1]}, panel);
      b.addEventListener('click', function () { rec.verdict = v[0]; save(); });
      return b;
    });
    var name = reviewerBox(panel);
    var note = el('textarea', {'class': 'mv-note-text', placeholder: 'note (optional)'}, panel);
    note.value = rec.note || '';
    note.addEventListener('input', function () { rec.note = note.value; if (rec.verdict) { save(); } });
    var state = el('div', {'class': 'mv-verdict-state'}, panel);
    function show() {
      buttons.forEach(function (b) { b.classList.toggle('chosen', b.getAttribute('data-verdict') === rec.verdict); });
      state.textContent = rec.verdict ? 'saved in this browser: ' + rec.verdict +
        (rec.reviewer ? ' by ' + rec.reviewer : '') : 'not reviewed yet';
      panel.setAttribute('data-verdict', rec.verdict || '');
    }
    function save() {
      rec.reviewer = name.value.trim();
      rec.reviewed_at = new Date().toISOString();
      write(caseId, rec);
      show();
    }
    show();
  }

  // the index: progress, filter, download
  var bar = document.getElementById('medseg-review-bar');
  if (bar) {
    // segmented cases only: a failed case has nothing to review
    var rows = Array.prototype.slice.call(document.querySelectorAll('tr[data-case]:not(.failed)'));
    var progress = el('span', {'class': 'mv-progress'}, bar);
    el('span', {text: '  show '}, bar);
    var filter = el('select', {'class': 'mv-filter'}, bar);
    [['all', 'all cases'], ['unreviewed', 'not reviewed']].concat(VERDICTS).forEach(function (v) {
      el('option', {value: v[0], text: v[1]}, filter);
    });
    el('span', {text: '  '}, bar);
    var name2 = reviewerBox(bar);
    var button = el('button', {type: 'button', 'class': 'mv-download', text: 'download review.json'}, bar);
    function refresh() {
      var n = 0, want = filter.value;
      rows.forEach(function (tr) {
        var id = tr.getAttribute('data-case'), r = read(id), cell = tr.cells[0];
        var old = cell.querySelector('.verdict');
        if (old) { cell.removeChild(old); }
        if (r && r.verdict) {
          n += 1;
          el('span', {'class': 'verdict ' + r.verdict, text: r.verdict.replace('-', ' ')}, cell);
        }
        var v = r && r.verdict ? r.verdict : 'unreviewed';
        tr.style.display = want === 'all' || want === v ? '' : 'none';
        tr.setAttribute('data-verdict', r && r.verdict ? r.verdict : '');
      });
      document.querySelectorAll('tr[data-case].failed').forEach(function (tr) {
        tr.style.display = want === 'all' ? '' : 'none';
      });
      progress.textContent = 'reviewed ' + n + ' of ' + rows.length;
      bar.setAttribute('data-reviewed', String(n));
    }
    filter.addEventListener('change', refresh);
    window.addEventListener('storage', refresh);
    window.addEventListener('pageshow', refresh);
    button.addEventListener('click', function () {
      var cases = [];
      rows.forEach(function (tr) {
        var id = tr.getAttribute('data-case'), r = read(id);
        if (r && r.verdict) {
          cases.push({case_id: id, verdict: r.verdict, note: r.note || '', reviewer: r.reviewer || name2.value.trim(),
            reviewed_at: r.reviewed_at || ''});
        }
      });
      var doc = {format: 'medseg-review/1', batch_id: B.batch_id, model_sha256: B.model_sha256,
        reviewer: name2.value.trim(), exported: new Date().toISOString(), cases: cases};
      var blob = new Blob([JSON.stringify(doc, null, 1)], {type: 'application/json'});
      var a = el('a', {href: URL.createObjectURL(blob), download: 'review.json'}, document.body);
      a.click();
      setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    });
    refresh();
  }
  }
})();
