#!/usr/bin/env python3
"""Reference renderings for tests/chat_template_test.cc.

Renders the real chat templates with jinja2 the way transformers does (sandboxed environment,
trim_blocks, lstrip_blocks, raise_exception) for several conversations and writes
tests/data/generated/chat_cases.json. Templates: SmolLM2's from the default model's GGUF
(tokenizer.chat_template) and the fixtures in tests/data/chat_templates/.

Usage: .venv/bin/python tests/tools/make_chat_cases.py [--model PATH] [--out DIR]
Needs: jinja2, gguf (pip).
"""

import argparse
import json
import os

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests/data/chat_templates")


def raise_exception(message):
    raise TemplateError(message)


def render(source, messages, add_generation_prompt, bos, eos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages,
                                          add_generation_prompt=add_generation_prompt,
                                          bos_token=bos, eos_token=eos)


def conversations():
    def m(role, content):
        return {"role": role, "content": content}

    return [
        [m("user", "Hello!")],
        [m("system", "You are terse."), m("user", "What is 2+2?")],
        [m("system", "Be kind."), m("user", "Hi"), m("assistant", "Hello! How can I help?"),
         m("user", "Tell me a joke.")],
        [m("user", "Translate: 猫"), m("assistant", "cat 🐱")],
        [m("user", "  padded with spaces and newlines\n\n"), m("assistant", "\tok \n"),
         m("user", "Grüße, Привет, مرحبا, 👨‍👩‍👧‍👦\nsecond line")],
        [m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "d")],
        [m("system", "Multi-line\nsystem prompt."), m("user", "<b>html</b> & {{braces}}")],
        [m("user", "")],
    ]


# Conversations some templates refuse (raise_exception); the C++ side must refuse them too.
def bad_conversations():
    return [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(REPO, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(REPO, "tests/data/generated"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    from gguf import GGUFReader

    smollm2 = GGUFReader(args.model).fields["tokenizer.chat_template"].contents()
    templates = [("smollm2", smollm2, "<|im_start|>", "<|im_end|>", "chatml")]
    for name, bos, eos, family in [("qwen2.5", "", "<|im_end|>", "chatml"),
                                   ("llama2", "<s>", "</s>", "llama2"),
                                   ("llama3", "<|begin_of_text|>", "<|eot_id|>", "llama3"),
                                   ("vicuna", "<s>", "</s>", "vicuna")]:
        with open(os.path.join(FIXTURES, name + ".jinja"), encoding="utf-8") as f:
            templates.append((name, f.read(), bos, eos, family))

    out = {"templates": [], "cases": []}
    for name, source, bos, eos, family in templates:
        out["templates"].append({"name": name, "source": source, "bos_token": bos,
                                 "eos_token": eos, "family": family})
        for conv in conversations():
            for gen in (False, True):
                out["cases"].append({"template": name, "messages": conv,
                                     "add_generation_prompt": gen,
                                     "expected": render(source, conv, gen, bos, eos)})
        for conv in bad_conversations():
            try:
                render(source, conv, True, bos, eos)
            except TemplateError:
                out["cases"].append({"template": name, "messages": conv,
                                     "add_generation_prompt": True, "error": True})
    with open(os.path.join(args.out, "chat_cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(out['cases'])} chat cases to {args.out}")


if __name__ == "__main__":
    main()
