# HDR-style histogram: filled in by the histogram work.
