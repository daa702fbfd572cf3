"""SAM-Med2D model library: everything that does not need the MONAI Label server.

Subpackages, each importing only those before it: ``common`` (settings, atomic files, LRU), ``modeling`` (the
network, its configs and builder), ``guard`` (limits and HTTP safety), ``io`` (checkpoints, images, volumes, DICOM),
``serving`` (a click's path and the model store), ``training`` (recipes, data, the loop, evaluation, curation),
``loop`` (retraining policy, uncertainty, the REST annotator). ``docs/architecture.md`` draws it.
"""
