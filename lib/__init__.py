"""SAM-Med2D model library: network, checkpoints, preprocessing, prediction and training helpers.

Nothing here depends on the MONAI Label server.
"""
