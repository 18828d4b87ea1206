"""The lecture's five architectures, each as calls to a running recur server with the default models.

    python examples/five_architectures.py --target localhost:50051
"""

from __future__ import annotations

import argparse

from sklearn.datasets import load_digits

from recur.client import RecurClient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", default="localhost:50051")
    args = p.parse_args()
    with RecurClient(args.target) as c:
        # one-to-one: one input step, one output (the most likely next character after "(").
        s = c.create("pylm").session_id
        r = c.step(s, text="(", top_k=3)
        print("one-to-one      '(' ->", repr(r.outputs[0].text), f"p={r.outputs[0].top_probs[0]:.2f}")

        # one-to-many: a prompt, then a sequence of outputs sampled from the carried state.
        s = c.create("pylm").session_id
        text = "".join(t.text for t in c.generate(s, prompt="import ", max_tokens=40, temperature=0.5, seed=1,
                                                   stop=["\n"]))
        print("one-to-many     'import ' ->", repr(text))

        # many-to-one: 8 steps of 8 pixels in, one label out (read at the last step).
        digits = load_digits()
        image = (digits.data[-1] / 16.0).astype("<f4").reshape(8, 8)
        s = c.create("digits").session_id
        r = c.step(s, features=image.tobytes(), final_only=True, top_k=1)
        print(f"many-to-one     digit image (true {digits.target[-1]}) -> {r.outputs[0].label}")

        # many-to-many (sequence to sequence): read a whole input sequence, then write an output sequence
        # from the state it left.
        s = c.create("pylm").session_id
        c.step(s, text="def add(a, b):\n    ")
        body = "".join(t.text for t in c.generate(s, max_tokens=30, temperature=0, stop=["\n"]))
        print("many-to-many    'def add(a, b):' ->", repr(body))

        # synced many-to-many: one output per input step (the Python token class of every character).
        s = c.create("pytag").session_id
        line = "x = len(s)  # n"
        r = c.step(s, text=line)
        print("synced m-to-m   ", " ".join(f"{ch!r}:{o.label}" for ch, o in zip(line, r.outputs)))
        assert len(r.outputs) == len(line) and all(o.label for o in r.outputs)


if __name__ == "__main__":
    main()
