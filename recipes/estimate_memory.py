"""Predict per-device training memory by category, and whether T4 / A100 / H100 hold it.

    python recipes/estimate_memory.py --paper                      # the course's settings + cited figures
    python recipes/estimate_memory.py --model llama2-7b --precision fp16 --quantization 4bit --gpu T4
    python recipes/estimate_memory.py --model path/to/model_dir --full --batch 4 --seq_len 1024

Nothing is downloaded: presets (llama2-7b, llama2-13b, bloom-1b7, bloom-7b1) are stored configs,
and a local directory needs only its config.json.
"""

import sys

from ftkit.memory import estimate_main

if __name__ == "__main__":
    sys.exit(estimate_main())
