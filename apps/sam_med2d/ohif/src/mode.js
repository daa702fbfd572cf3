// The SAM-Med2D OHIF mode: OHIF's segmentation mode (its labelmap segmentation panel: edit, rename, export DICOM
// SEG) with the SAM-Med2D prompt panel in front and the three prompt tools added to its tool groups. OHIF imports
// this ES module at start-up (app-config.js `modes`) and builds the mode with `modeFactory`.
import { PANEL_ID, startSession, stopSession } from './extension.js';
import { TOOLS } from './session.js';

const MODE_ID = 'sam-med2d';
// OHIF imports every key of a mode's `extensions` before the mode starts: ours is the module's address.
const EXTENSION_MODULE = new URL('./extension.js', import.meta.url).pathname;
const SEGMENTATION_MODE = '@ohif/mode-segmentation';
const BASIC_MODE = '@ohif/mode-basic';

// Cornerstone's Probe and RectangleROI tools under our names: they draw the prompts and leave annotations the
// session reads. Their measurement text is hidden; foreground is green, background red, the box yellow.
const PROMPT_TOOLS = [
  { toolName: TOOLS.foreground, parentTool: 'Probe' },
  { toolName: TOOLS.background, parentTool: 'Probe' },
  { toolName: TOOLS.box, parentTool: 'RectangleROI' },
];
const PROMPT_STYLES = {
  [TOOLS.foreground]: { color: 'rgb(0, 230, 0)', colorHighlighted: 'rgb(120, 255, 120)', textBoxVisibility: false },
  [TOOLS.background]: { color: 'rgb(240, 40, 40)', colorHighlighted: 'rgb(255, 130, 130)', textBoxVisibility: false },
  [TOOLS.box]: { color: 'rgb(240, 220, 0)', colorHighlighted: 'rgb(255, 240, 120)', textBoxVisibility: false },
};
const TOOL_GROUPS = ['default', 'mpr'];

async function modeFactory({ loadModules }) {
  const [segmentationMode, basicMode] = await loadModules([SEGMENTATION_MODE, BASIC_MODE]);
  const base = segmentationMode.modeInstance;
  const [route] = base.routes;
  const layout = route.layoutInstance;
  return {
    ...base,
    id: MODE_ID,
    routeName: MODE_ID,
    displayName: 'SAM-Med2D',
    routes: [
      {
        ...route,
        layoutInstance: {
          ...layout,
          props: { ...layout.props, rightPanels: [PANEL_ID, ...layout.props.rightPanels], rightPanelClosed: false },
        },
      },
    ],
    extensions: { ...base.extensions, [EXTENSION_MODULE]: '^1.0.0' },
    toolGroupAdditions: Object.fromEntries(TOOL_GROUPS.map(group => [group, [{ passive: PROMPT_TOOLS }]])),
    // The segmentation mode's own mode entry is the basic one plus a switch to the segmentation panel when the first
    // segmentation appears, which would hide the prompt panel at the first mask: ours is the basic one alone.
    onModeEnter(context) {
      basicMode.modeInstance.onModeEnter.call(this, context);
      const { style } = window.cornerstoneTools.annotation.config;
      TOOL_GROUPS.forEach(group => style.setToolGroupToolStyles(group, PROMPT_STYLES));
      startSession(context);
    },
    onModeExit(context) {
      stopSession();
      base.onModeExit.call(this, context);
    },
  };
}

export default {
  id: MODE_ID,
  modeFactory,
  extensionDependencies: { [EXTENSION_MODULE]: '^1.0.0' },
};
