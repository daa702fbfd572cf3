"""Files in and out: checkpoints of every published layout, images and volumes, DICOM series and SEG."""
