// The SAM-Med2D OHIF extension: the prompt tools' panel (point and box prompts, propagation, segment name, save,
// next series). OHIF imports this ES module at start-up (app-config.js `extensions`); it shares no module system
// with the prebuilt viewer, so it uses what the viewer exposes on `window` (cornerstone, cornerstoneTools) and its
// services, and draws its panel with the DOM inside a host element it hands to OHIF's React.
import { AnnotationSession, TOOLS } from './session.js';

export const EXTENSION_ID = 'sam-med2d';
export const PANEL_ID = `${EXTENSION_ID}.panelModule.prompts`;

let session = null;
let host = null;
let unmount = null;

export function startSession(context) {
  session = new AnnotationSession(context);
  session.start();
  if (host) {
    unmount?.();
    unmount = renderPanel(host, session);
  }
  return session;
}

export function stopSession() {
  unmount?.();
  session?.stop();
  session = null;
}

const STYLE = `
.sam-med2d { padding: 8px 10px; color: #d8dbe6; font-size: 13px; display: flex; flex-direction: column; gap: 10px; }
.sam-med2d h3 { font-size: 14px; color: #fff; margin: 0; }
.sam-med2d .sam-row { display: flex; gap: 6px; flex-wrap: wrap; align-items: center; }
.sam-med2d button { background: #21264a; border: 1px solid #3a4170; color: #e8eaf6; border-radius: 4px;
  padding: 4px 9px; }
.sam-med2d button:hover { background: #2f3666; }
.sam-med2d button[aria-pressed="true"] { background: #4a5ad6; border-color: #7d8af0; }
.sam-med2d button:disabled { opacity: 0.5; }
.sam-med2d button.primary { background: #2f7d4a; border-color: #4aa86a; }
.sam-med2d input[type="text"] { background: #0b0e1f; border: 1px solid #3a4170; color: #fff; border-radius: 4px;
  padding: 4px 6px; width: 100%; }
.sam-med2d .status { color: #a9b0d6; min-height: 2.6em; }
.sam-med2d .hint { color: #7f86ad; font-size: 12px; }
`;

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key.startsWith('on')) {
      node.addEventListener(key.slice(2).toLowerCase(), value);
    } else {
      node.setAttribute(key, value);
    }
  }
  node.append(...children);
  return node;
}

/** Build the panel's DOM in ``host`` and keep it in step with the session; returns the clean-up. */
function renderPanel(host, annotation) {
  const toolButtons = [
    [TOOLS.foreground, 'Foreground point'],
    [TOOLS.background, 'Background point'],
    [TOOLS.box, 'Box'],
  ].map(([toolName, text]) =>
    element('button', { type: 'button', 'data-tool': toolName, onClick: () => annotation.activateTool(toolName) }, text)
  );
  const propagate = element('input', { type: 'checkbox', id: 'sam-med2d-propagate' });
  propagate.addEventListener('change', () => (annotation.propagate = propagate.checked));
  const name = element('input', { type: 'text', id: 'sam-med2d-segment-name', 'aria-label': 'Segment name' });
  name.addEventListener('change', () => annotation.renameSegment(name.value.trim() || 'object'));
  const count = element('div', { 'data-cy': 'sam-med2d-mask' });
  const status = element('div', { class: 'status', role: 'status' });
  const review = element('button', { type: 'button', hidden: '' });
  review.addEventListener('click', () => annotation.showImage(Number(review.dataset.image)));
  const save = element(
    'button',
    { type: 'button', class: 'primary', onClick: () => annotation.save(name.value.trim()) },
    'Save label'
  );
  const next = element('button', { type: 'button', onClick: () => annotation.next() }, 'Next series');
  const clear = element('button', { type: 'button', onClick: () => annotation.clearPrompts() }, 'Clear prompts');
  host.replaceChildren(
    element('style', {}, STYLE),
    element(
      'div',
      { class: 'sam-med2d' },
      element('h3', {}, 'SAM-Med2D'),
      element('div', { class: 'sam-row' }, ...toolButtons),
      element('div', { class: 'hint' }, 'Each prompt segments its slice at once; add points to correct.'),
      element('label', { class: 'sam-row' }, propagate, 'Propagate to neighbouring slices'),
      element('label', { for: 'sam-med2d-segment-name' }, 'Segment name'),
      name,
      count,
      review,
      status,
      element('div', { class: 'sam-row' }, save, next, clear)
    )
  );
  return annotation.subscribe(state => {
    toolButtons.forEach(b => b.setAttribute('aria-pressed', String(b.dataset.tool === state.tool)));
    if (document.activeElement !== name) {
      name.value = state.segmentName;
    }
    count.textContent = `Mask: ${state.voxels} voxels on ${state.slices} slice${state.slices === 1 ? '' : 's'}`;
    status.textContent = state.status;
    save.disabled = state.busy;
    next.disabled = state.busy;
    review.hidden = state.reviewFirst === null || state.reviewFirst === undefined;
    if (!review.hidden) {
      review.dataset.image = state.reviewFirst;
      review.textContent = `Review image ${state.reviewFirst} first`;
    }
  });
}

// OHIF renders a panel as a React component. This one renders a single host <div> (a React 18 element written as
// the plain object React.createElement returns, as this module has no React of its own) whose ref hands the node to
// renderPanel. The ref is one stable function, so React calls it once per mount and once (with null) per unmount.
const REACT_ELEMENT = Symbol.for('react.element');

function hostRef(node) {
  unmount?.();
  host = node;
  unmount = node && session ? renderPanel(node, session) : null;
}

function PromptPanel() {
  return {
    $$typeof: REACT_ELEMENT,
    type: 'div',
    key: null,
    ref: hostRef,
    props: { 'data-cy': 'sam-med2d-panel' },
    _owner: null,
  };
}

export default {
  id: EXTENSION_ID,
  getPanelModule() {
    return [
      {
        name: 'prompts',
        iconName: 'tab-roi-threshold',
        iconLabel: 'SAM-Med2D',
        label: 'SAM-Med2D',
        component: PromptPanel,
      },
    ];
  },
};
