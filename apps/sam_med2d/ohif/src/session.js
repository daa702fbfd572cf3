// One annotator's work on the series in the viewport: the prompts placed with the SAM-Med2D tools, the server's
// answers written into an OHIF labelmap segment, saving it as the series' label and asking for the next series.
// It talks to the SAM-Med2D MONAI Label server that serves this page (same origin).

export const TOOLS = {
  foreground: 'SamMed2DForeground',
  background: 'SamMed2DBackground',
  box: 'SamMed2DBox',
};
const PROMPT_TOOLS = new Set(Object.values(TOOLS));
export const SEGMENT_INDEX = 1;
export const DEFAULT_SEGMENT_NAME = 'object';

/** The raw NRRD the server answers with (``result_compress: false``): voxels ``[i + I * (j + J * k)]``. */
export function parseNrrd(buffer) {
  const bytes = new Uint8Array(buffer);
  let end = -1;
  for (let n = 1; n < bytes.length; n++) {
    if (bytes[n] === 10 && bytes[n - 1] === 10) {
      end = n + 1;
      break;
    }
  }
  if (end < 0) {
    throw new Error('the server answered something that is not an NRRD file');
  }
  const fields = {};
  for (const line of new TextDecoder().decode(bytes.subarray(0, end)).split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0 && !line.startsWith('#')) {
      fields[line.slice(0, colon).trim()] = line.slice(colon + 1).replace(/^=/, '').trim();
    }
  }
  if (fields.encoding !== 'raw' || !['uint8', 'unsigned char', 'uchar'].includes(fields.type)) {
    throw new Error(`unexpected NRRD encoding ${fields.encoding} / type ${fields.type}`);
  }
  const sizes = fields.sizes.split(/\s+/).map(Number);
  const vectors = text => (text.match(/\(([^)]*)\)/g) || []).map(v => v.slice(1, -1).split(',').map(Number));
  return {
    sizes,
    origin: vectors(fields['space origin'])[0],
    directions: vectors(fields['space directions']),
    voxels: bytes.subarray(end, end + sizes.reduce((a, b) => a * b, 1)),
  };
}

const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];

export class AnnotationSession {
  constructor({ servicesManager, commandsManager }) {
    this.services = servicesManager.services;
    this.commandsManager = commandsManager;
    this.clientId = `ohif-${Math.random().toString(36).slice(2, 10)}`;
    this.listeners = new Set();
    this.segmentationId = null;
    this.series = null; // {displaySet, viewportId, slices: imageIds in the server's slice order}
    this.lastPrompts = null;
    this.running = null;
    this.rerun = false;
    this.state = { status: 'Pick a prompt tool, then click on the image.', busy: false, voxels: 0, slices: 0 };
    this.propagate = false;
    this.onAnnotation = this.onAnnotation.bind(this);
  }

  // ------------------------------------------------------------------------------------------------- lifecycle
  start() {
    const { eventTarget } = window.cornerstone;
    const { Events } = window.cornerstoneTools.Enums;
    for (const name of [Events.ANNOTATION_COMPLETED, Events.ANNOTATION_REMOVED]) {
      eventTarget.addEventListener(name, this.onAnnotation);
    }
    const { segmentationService } = this.services;
    this.subscriptions = [
      segmentationService.subscribe(segmentationService.EVENTS.SEGMENTATION_MODIFIED, () => this.changed({})),
      segmentationService.subscribe(segmentationService.EVENTS.SEGMENTATION_DATA_MODIFIED, ({ segmentationId }) => {
        if (segmentationId === this.segmentationId) {
          this.recountSoon();
        }
      }),
      segmentationService.subscribe(segmentationService.EVENTS.SEGMENTATION_REMOVED, ({ segmentationId }) => {
        if (segmentationId === this.segmentationId) {
          this.segmentationId = null;
          this.changed({ voxels: 0, slices: 0 });
        }
      }),
    ];
  }

  stop() {
    const { eventTarget } = window.cornerstone;
    const { Events } = window.cornerstoneTools.Enums;
    for (const name of [Events.ANNOTATION_COMPLETED, Events.ANNOTATION_REMOVED]) {
      eventTarget.removeEventListener(name, this.onAnnotation);
    }
    this.subscriptions?.forEach(s => s.unsubscribe());
    clearTimeout(this.recountTimer);
    this.listeners.clear();
  }

  subscribe(listener) {
    this.listeners.add(listener);
    listener({ ...this.state, segmentName: this.segmentName() });
    return () => this.listeners.delete(listener);
  }

  changed(update) {
    this.state = { ...this.state, ...update, segmentName: this.segmentName() };
    this.listeners.forEach(listener => listener(this.state));
  }

  // --------------------------------------------------------------------------------------------------- prompts
  activateTool(toolName) {
    this.commandsManager.runCommand('setToolActive', { toolName });
    this.changed({ tool: toolName });
  }

  onAnnotation(event) {
    const annotation = event.detail?.annotation;
    if (annotation && PROMPT_TOOLS.has(annotation.metadata?.toolName)) {
      if (event.type === window.cornerstoneTools.Enums.Events.ANNOTATION_COMPLETED) {
        this.promptedImageId = annotation.metadata.referencedImageId; // the slice to segment
      }
      this.run();
    }
  }

  prompts() {
    return window.cornerstoneTools.annotation.state
      .getAllAnnotations()
      .filter(a => PROMPT_TOOLS.has(a.metadata?.toolName) && a.metadata.referencedImageId);
  }

  clearPrompts() {
    const { annotation } = window.cornerstoneTools;
    for (const prompt of this.prompts()) {
      annotation.state.removeAnnotation(prompt.annotationUID);
    }
    this.lastPrompts = null;
    window.cornerstone.getRenderingEngines().forEach(engine => engine.render());
    this.changed({ status: 'Prompts cleared; the mask stays until you change it.' });
  }

  /** The series of the active viewport, its slices in the server's order (by position along the slice normal, as
   * the server's series reader sorts them), checked against the server's geometry when an answer comes. */
  currentSeries() {
    const { viewportGridService, displaySetService } = this.services;
    const viewportId = viewportGridService.getActiveViewportId();
    const uid = viewportGridService.getDisplaySetsUIDsForViewport(viewportId)?.[0];
    const displaySet = uid && displaySetService.getDisplaySetByUID(uid);
    if (!displaySet?.imageIds?.length) {
      throw new Error('open an image series in the viewport first');
    }
    if (this.series?.displaySet !== displaySet) {
      const { metaData } = window.cornerstone;
      const plane = imageId => metaData.get('imagePlaneModule', imageId);
      const first = plane(displaySet.imageIds[0]);
      const normal = cross(first.rowCosines, first.columnCosines);
      const slices = [...displaySet.imageIds].sort(
        (a, b) => dot(plane(a).imagePositionPatient, normal) - dot(plane(b).imagePositionPatient, normal)
      );
      this.series = { displaySet, slices, plane, rows: first.rows, columns: first.columns };
      this.lastPrompts = null;
      this.segmentationId = null; // another series: its own segmentation
    }
    this.series.viewportId = viewportId;
    return this.series;
  }

  /** The number the viewport shows for the server's slice ``k`` (the viewer orders images its own way). */
  imageNumber(k) {
    return this.series.displaySet.imageIds.indexOf(this.series.slices[k]) + 1;
  }

  /** Voxel ``[i, j]`` of a world point on an image: ``i`` across, ``j`` down. */
  pixel(imageId, world) {
    const [x, y] = window.cornerstone.utilities.worldToImageCoords(imageId, world);
    const { rows, columns } = this.series;
    return [Math.min(columns - 1, Math.max(0, Math.floor(x))), Math.min(rows - 1, Math.max(0, Math.floor(y)))];
  }

  request() {
    const series = this.currentSeries();
    const prompts = this.prompts().filter(p => series.displaySet.imageIds.includes(p.metadata.referencedImageId));
    if (!prompts.length) {
      return null;
    }
    const onImages = new Set(prompts.map(p => p.metadata.referencedImageId));
    const latest = onImages.has(this.promptedImageId) ? this.promptedImageId : [...onImages].pop();
    const slice = series.slices.indexOf(latest);
    const params = { foreground: [], background: [], slice };
    for (const prompt of prompts.filter(p => p.metadata.referencedImageId === latest)) {
      const points = prompt.data.handles.points.map(world => this.pixel(latest, world));
      if (prompt.metadata.toolName === TOOLS.box) {
        const is = points.map(p => p[0]);
        const js = points.map(p => p[1]);
        params.box = [Math.min(...is), Math.min(...js), Math.max(...is), Math.max(...js)];
      } else {
        const key = prompt.metadata.toolName === TOOLS.foreground ? 'foreground' : 'background';
        params[key].push([...points[0], slice]);
      }
    }
    // The server refines its previous mask while the prompts only grow; anything else starts the mask afresh.
    const previous = this.lastPrompts;
    const grows =
      previous &&
      previous.slice === slice &&
      JSON.stringify(previous.box) === JSON.stringify(params.box) &&
      ['foreground', 'background'].every(
        key => JSON.stringify(params[key].slice(0, previous[key].length)) === JSON.stringify(previous[key])
      );
    this.lastPrompts = params;
    return {
      model: params.box ? 'sam_med2d_box' : 'sam_med2d_points',
      body: {
        ...params,
        reset: !grows,
        client_id: this.clientId,
        propagate: this.propagate ? 'both' : 'none',
        result_extension: '.nrrd',
        result_dtype: 'uint8',
        result_compress: false,
      },
    };
  }

  /** Run SAM-Med2D on the prompts; while a request is out, later prompts wait for it and are sent together. */
  async run() {
    if (this.running) {
      this.rerun = true;
      return this.running;
    }
    this.running = (async () => {
      try {
        do {
          this.rerun = false;
          await this.infer();
        } while (this.rerun);
      } catch (error) {
        this.changed({ status: `Segmentation failed: ${error.message}`, busy: false });
      } finally {
        this.running = null;
      }
    })();
    return this.running;
  }

  async infer() {
    const request = this.request();
    if (!request) {
      return;
    }
    const { displaySet } = this.series;
    this.changed({ status: 'Segmenting…', busy: true });
    const form = new FormData();
    form.append('params', JSON.stringify(request.body));
    const query = new URLSearchParams({ image: displaySet.SeriesInstanceUID, output: 'all' });
    const response = await fetch(`/infer/${request.model}?${query}`, { method: 'POST', body: form });
    if (!response.ok) {
      throw new Error(await errorText(response));
    }
    const answer = await response.formData();
    const result = JSON.parse(answer.get('params')); // a plain form field; the label is a file part
    const label = parseNrrd(await answer.get('image').arrayBuffer());
    this.checkGeometry(label);
    const slices = result.propagation ? result.propagation.slices.map(s => s.slice) : [result.slice];
    await this.paint(label, slices);
    const counted = this.count();
    const review = result.propagation?.review_first;
    this.changed({
      ...counted,
      busy: false,
      reviewFirst: review === undefined || review === null ? null : this.imageNumber(review),
      status: `Mask on image ${this.imageNumber(result.slice)} (predicted IoU ${Number(result.iou).toFixed(2)}).`,
    });
  }

  /** The answer's first slice must be where this viewer has the series' first slice; otherwise the slice order
   * assumed here is not the server's and masks would land on the wrong images. */
  checkGeometry(label) {
    const { slices, plane, displaySet } = this.series;
    const [I, J, K] = label.sizes;
    const first = plane(slices[0]);
    const far = [0, 1, 2].some(a => Math.abs(first.imagePositionPatient[a] - label.origin[a]) > 1e-2);
    if (I !== first.columns || J !== first.rows || K !== displaySet.imageIds.length || far) {
      throw new Error(`the server's grid ${I}x${J}x${K} at ${label.origin} is not this series' layout`);
    }
  }

  // ----------------------------------------------------------------------------------------------- labelmap
  async segmentation() {
    const { segmentationService } = this.services;
    const { displaySet, viewportId } = this.series;
    if (this.segmentationId && segmentationService.getSegmentation(this.segmentationId)) {
      return this.segmentationId;
    }
    this.segmentationId = await segmentationService.createLabelmapForDisplaySet(displaySet, {
      label: 'SAM-Med2D',
      segments: { [SEGMENT_INDEX]: { label: DEFAULT_SEGMENT_NAME, active: true } },
    });
    await segmentationService.addSegmentationRepresentation(viewportId, { segmentationId: this.segmentationId });
    return this.segmentationId;
  }

  labelmapImages() {
    const { segmentationService } = this.services;
    const segmentation = segmentationService.getSegmentation(this.segmentationId);
    const { imageIds, referencedImageIds } = segmentation.representationData.Labelmap;
    const byReference = new Map(referencedImageIds.map((reference, n) => [reference, imageIds[n]]));
    return this.series.slices.map(reference => window.cornerstone.cache.getImage(byReference.get(reference)));
  }

  async paint(label, slices) {
    const segmentationId = await this.segmentation();
    const [I, J] = label.sizes;
    const images = this.labelmapImages();
    for (const k of slices) {
      const data = images[k].voxelManager.getScalarData();
      const mask = label.voxels.subarray(k * I * J, (k + 1) * I * J);
      for (let n = 0; n < I * J; n++) {
        if (mask[n]) {
          data[n] = SEGMENT_INDEX;
        } else if (data[n] === SEGMENT_INDEX) {
          data[n] = 0;
        }
      }
    }
    const { triggerSegmentationEvents } = window.cornerstoneTools.segmentation;
    triggerSegmentationEvents.triggerSegmentationDataModified(segmentationId);
  }

  /** Brush strokes modify the labelmap many times a second: count once they pause. */
  recountSoon() {
    clearTimeout(this.recountTimer);
    this.recountTimer = setTimeout(() => this.changed(this.count()), 250);
  }

  count() {
    if (!this.segmentationId || !this.series) {
      return { voxels: 0, slices: 0 };
    }
    let voxels = 0;
    let slices = 0;
    for (const image of this.labelmapImages()) {
      const data = image.voxelManager.getScalarData();
      let inSlice = 0;
      for (let n = 0; n < data.length; n++) {
        if (data[n]) {
          inSlice++;
        }
      }
      voxels += inSlice;
      slices += inSlice ? 1 : 0;
    }
    return { voxels, slices };
  }

  segmentName() {
    const segmentation = this.segmentationId && this.services.segmentationService.getSegmentation(this.segmentationId);
    return segmentation?.segments?.[SEGMENT_INDEX]?.label ?? DEFAULT_SEGMENT_NAME;
  }

  renameSegment(name) {
    if (this.segmentationId) {
      this.services.segmentationService.setSegmentLabel(this.segmentationId, SEGMENT_INDEX, name);
    }
    this.changed({});
  }

  // --------------------------------------------------------------------------------------------- save, next
  /** The segment as the series' final label: ``PUT /datastore/label``, which the server stores as a DICOM SEG in
   * the PACS (the retraining scheduler counts it). The file is OHIF's raw label volume on the series grid. */
  async save(name) {
    if (!this.segmentationId || !this.count().voxels) {
      this.changed({ status: 'Nothing to save: segment something first.' });
      return;
    }
    if (name) {
      this.renameSegment(name);
    }
    const { rows, columns, slices, displaySet } = this.series;
    const volume = new Uint8Array(rows * columns * slices.length);
    this.labelmapImages().forEach((image, k) => volume.set(image.voxelManager.getScalarData(), k * rows * columns));
    const segments = this.services.segmentationService.getSegmentation(this.segmentationId).segments;
    const labelInfo = Object.entries(segments)
      .filter(([, segment]) => segment)
      .map(([index, segment]) => ({ name: segment.label, idx: Number(index) }));
    const form = new FormData();
    form.append('label', new Blob([volume]), 'label.bin');
    form.append('params', JSON.stringify({ label_info: labelInfo, client_id: this.clientId }));
    this.changed({ status: 'Saving…', busy: true });
    const query = new URLSearchParams({ image: displaySet.SeriesInstanceUID, tag: 'final' });
    const response = await fetch(`/datastore/label?${query}`, { method: 'PUT', body: form });
    if (!response.ok) {
      this.changed({ status: `Not saved: ${await errorText(response)}`, busy: false });
      return;
    }
    this.changed({
      status: `Saved "${this.segmentName()}" as a DICOM SEG of this series in the PACS.`,
      busy: false,
    });
  }

  /** Open the series ``/activelearning/sam_uncertainty`` suggests (the one the model is least sure about). */
  async next() {
    this.changed({ status: 'Asking the server for the next series…', busy: true });
    const response = await fetch('/activelearning/sam_uncertainty', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ client_id: this.clientId }),
    });
    const sample = response.ok ? await response.json() : null;
    if (!sample?.id) {
      const why = response.ok ? 'every series has a label' : await errorText(response);
      this.changed({ status: `No next series: ${why}.`, busy: false });
      return;
    }
    const query = new URLSearchParams({ StudyInstanceUIDs: sample.StudyInstanceUID, SeriesInstanceUIDs: sample.id });
    window.location.assign(`${window.location.pathname}?${query}`);
  }

  /** Show image ``number`` (as the viewport numbers them) in the viewport. */
  showImage(number) {
    const { viewportId, displaySet } = this.series;
    const viewport = this.services.cornerstoneViewportService.getCornerstoneViewport(viewportId);
    const index = viewport.getImageIds().indexOf(displaySet.imageIds[number - 1]);
    window.cornerstone.utilities.jumpToSlice(viewport.element, { imageIndex: index });
  }
}

async function errorText(response) {
  const text = await response.text();
  try {
    const detail = JSON.parse(text).detail;
    return typeof detail === 'string' ? detail : JSON.stringify(detail);
  } catch {
    return `${response.status} ${text.slice(0, 300)}`;
  }
}
