"""`kandinsky-bench`: latency and throughput of the served pipeline, side by side with diffusers."""
