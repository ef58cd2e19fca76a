"""Ray Serve entry point: `serve run serve/config.yaml` (or `serve run serve.app:app`).

Reads the student folder from PROXYKD_MODEL_PATH, the served name from PROXYKD_MODEL_NAME
(default "proxykd-student") and PROXYKD_USE_GPU=1 to run vLLM on GPUs.
"""

import os

from proxykd.serving import build_app

app = build_app(
    os.environ["PROXYKD_MODEL_PATH"],
    os.environ.get("PROXYKD_MODEL_NAME", "proxykd-student"),
    use_gpu=os.environ.get("PROXYKD_USE_GPU") == "1",
)
