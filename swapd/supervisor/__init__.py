"""The supervisor process: orchestration, generations and slots, lifecycle, the process
seam, swaps, patch delivery and journal, re-exec, listeners, the service-manager side of
systemd. Nothing here is imported by `swapd.worker` (a test checks it)."""
