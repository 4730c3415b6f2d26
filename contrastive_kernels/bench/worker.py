"""Subprocess entry point: measure one (case, backend) and print one JSON line."""
import json
import sys


def main(argv):
    spec = json.loads(argv[1])
    import torch  # noqa: F401  (after argument parsing, so a bad call fails fast)

    from .cases import Case
    from .measure import measure_in_process

    c = Case(spec["op"], tuple(tuple(x) for x in spec["shape"]), spec["dtype"], spec.get("label", ""))
    result = measure_in_process(c, spec["backend"], spec["device"], spec["repeats"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
