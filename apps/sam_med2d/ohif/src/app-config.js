// OHIF configuration of the viewer the SAM-Med2D app serves at /ohif/: the PACS is read through the MONAI Label
// server's DICOMweb proxy (same origin, so no CORS), and the SAM-Med2D mode and extension are ES modules that OHIF
// imports from this server when it starts.
window.config = {
  routerBasename: '/ohif',
  showStudyList: true,
  extensions: ['/ohif/sam-med2d/extension.js'],
  modes: ['/ohif/sam-med2d/mode.js'],
  customizationService: {},
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Orthanc 1.10 answers one frame request at a time well; many in parallel made it fail in our trials.
  maxNumRequests: { interaction: 10, thumbnail: 2, prefetch: 4 },
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'PACS (through the SAM-Med2D server)',
        name: 'pacs',
        wadoUriRoot: '/proxy/dicom/wado',
        qidoRoot: '/proxy/dicom/qido',
        wadoRoot: '/proxy/dicom/wado',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
