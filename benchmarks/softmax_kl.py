"""The softmax-KL benchmark (the harness lives in minikd/bench.py, also run as `minikd bench`)."""
import sys

from minikd.bench import main

if __name__ == "__main__":
    sys.exit(main())
