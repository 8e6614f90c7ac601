// Small SVG line charts for the portal: a time axis, a value axis with round ticks, the
// series as a line over a shaded area (gaps where a value is null), an optional limit line,
// and a readout of the point under the pointer or the keyboard cursor. No dependencies.

const SVG = 'http://www.w3.org/2000/svg';
const W = 440;
const H = 200;
const PAD = { left: 52, right: 10, top: 12, bottom: 26 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Round tick values covering [0, max]: 1, 2 or 5 times a power of ten apart; whole numbers
 * only for `integer` series (counts: no "0.5 connections"). */
export function niceTicks(max, count = 4, integer = false) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const pow = 10 ** Math.floor(Math.log10(raw));
  const nice = [1, 2, 5, 10].map((m) => m * pow).find((s) => s >= raw);
  const step = integer ? Math.max(1, Math.round(nice)) : nice;
  const ticks = [];
  for (let v = 0; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

function timeLabel(t, spanMs) {
  const d = new Date(t);
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (spanMs <= 36 * 3600 * 1000) return hm;
  return d.toLocaleDateString([], { month: 'short', day: 'numeric' });
}

/**
 * A chart of `points` ([{t: ms, v: number|null}]) between `from` and `to` (ms).
 * Options: title, format (value → text), limit (a horizontal line), limitLabel, empty
 * (text when there is nothing to plot), integer (a count: whole-number ticks). Returns a
 * <figure>.
 */
export function lineChart({ title, points, from, to, format = String, limit, limitLabel, empty, integer = false }) {
  const fig = document.createElement('figure');
  fig.className = 'chart';
  const cap = document.createElement('figcaption');
  cap.textContent = title;
  fig.append(cap);
  const values = points.filter((p) => p.v !== null && Number.isFinite(p.v));
  const nonZero = values.filter((p) => p.v !== 0).length;
  fig.dataset.points = String(values.length);
  fig.dataset.nonzero = String(nonZero);
  if (values.length === 0) {
    const p = document.createElement('p');
    p.className = 'nodata';
    p.textContent = empty || 'No data for this time range.';
    fig.append(p);
    return fig;
  }
  const max = Math.max(...values.map((p) => p.v), limit || 0);
  const ticks = niceTicks(max, 4, integer);
  const top = ticks[ticks.length - 1] || 1;
  const span = Math.max(1, to - from);
  const x = (t) => PAD.left + ((t - from) / span) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);

  const latest = values[values.length - 1];
  const peak = values.reduce((a, b) => (b.v > a.v ? b : a));
  const svg = el('svg', {
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    tabindex: 0,
    'aria-label': `${title}: latest ${format(latest.v)}, peak ${format(peak.v)}. Use the arrow keys to read points.`,
  });
  for (const v of ticks) {
    svg.append(el('line', { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: 'grid' }));
    svg.append(el('text', { x: PAD.left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, format(v)));
  }
  const xTicks = 4;
  for (let i = 0; i <= xTicks; i++) {
    const t = from + (span * i) / xTicks;
    const anchor = i === 0 ? 'start' : i === xTicks ? 'end' : 'middle';
    svg.append(el('text', { x: x(t), y: H - 8, 'text-anchor': anchor, class: 'tick' }, timeLabel(t, span)));
  }
  // Runs of consecutive values; a null breaks the line.
  const runs = [];
  let run = [];
  for (const p of points) {
    if (p.v === null || !Number.isFinite(p.v)) {
      if (run.length) runs.push(run);
      run = [];
    } else run.push(p);
  }
  if (run.length) runs.push(run);
  for (const r of runs) {
    const line = r.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
    const area = `${line}L${x(r[r.length - 1].t).toFixed(1)},${y(0)}L${x(r[0].t).toFixed(1)},${y(0)}Z`;
    svg.append(el('path', { d: area, class: 'area' }));
    svg.append(el('path', { d: line, class: 'line' }));
    if (r.length === 1) svg.append(el('circle', { cx: x(r[0].t), cy: y(r[0].v), r: 2.5, class: 'dot' }));
  }
  if (limit) {
    svg.append(el('line', { x1: PAD.left, x2: W - PAD.right, y1: y(limit), y2: y(limit), class: 'limit' }));
    svg.append(el('text', { x: W - PAD.right, y: y(limit) - 4, 'text-anchor': 'end', class: 'limit-label' },
      limitLabel || `limit ${format(limit)}`));
  }
  // The readout: a cursor line, a dot and a label, moved by pointer or arrow keys.
  const cursor = el('g', { class: 'cursor', visibility: 'hidden' });
  const cline = el('line', { y1: PAD.top, y2: H - PAD.bottom });
  const cdot = el('circle', { r: 3.5 });
  const clabel = el('text', { y: PAD.top + 10 });
  cursor.append(cline, cdot, clabel);
  svg.append(cursor);
  const readout = document.createElement('p');
  readout.className = 'readout';
  readout.setAttribute('aria-live', 'polite');
  let index = values.length - 1;
  function show(i) {
    index = Math.max(0, Math.min(values.length - 1, i));
    const p = values[index];
    const px = x(p.t);
    cline.setAttribute('x1', px);
    cline.setAttribute('x2', px);
    cdot.setAttribute('cx', px);
    cdot.setAttribute('cy', y(p.v));
    const text = `${new Date(p.t).toLocaleString()}: ${format(p.v)}`;
    clabel.textContent = text;
    const right = px > W / 2;
    clabel.setAttribute('x', right ? px - 6 : px + 6);
    clabel.setAttribute('text-anchor', right ? 'end' : 'start');
    cursor.setAttribute('visibility', 'visible');
    readout.textContent = text;
  }
  svg.addEventListener('pointermove', (e) => {
    const box = svg.getBoundingClientRect();
    const t = from + ((((e.clientX - box.left) / box.width) * W - PAD.left) / (W - PAD.left - PAD.right)) * span;
    let best = 0;
    values.forEach((p, i) => {
      if (Math.abs(p.t - t) < Math.abs(values[best].t - t)) best = i;
    });
    show(best);
  });
  svg.addEventListener('pointerleave', () => cursor.setAttribute('visibility', 'hidden'));
  svg.addEventListener('focus', () => show(index));
  svg.addEventListener('blur', () => cursor.setAttribute('visibility', 'hidden'));
  svg.addEventListener('keydown', (e) => {
    const moves = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity };
    if (!(e.key in moves)) return;
    e.preventDefault();
    const m = moves[e.key];
    show(Number.isFinite(m) ? index + m : m < 0 ? 0 : values.length - 1);
  });
  fig.append(svg, readout);
  return fig;
}
