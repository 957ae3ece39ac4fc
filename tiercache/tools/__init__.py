"""What runs beside a cache: the command line, calibration, the trace simulator, charts."""
