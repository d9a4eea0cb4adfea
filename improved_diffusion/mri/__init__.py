"""MRI physics: centered FFTs, undersampling masks, SENSE operators, coil maps and metrics."""
