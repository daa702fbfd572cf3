"""The loop around the server: when to retrain (policy), which image to label next (uncertainty), and a simulated
annotator that works through REST."""
