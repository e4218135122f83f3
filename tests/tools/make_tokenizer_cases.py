#!/usr/bin/env python3
"""Reference data for tests/tokenizer_test.cc.

Writes into tests/data/generated/:
  smollm2_gguf_vocab.json  the default model's tokenizer.ggml.* data (so the C++ test can build a
                           GgufTokenizerData without depending on the GGUF loader)
  smollm2_tokenizer.json   a Hugging Face tokenizer.json built from that vocab + merges the way
                           SmolLM2's own tokenizer.json is defined
  tokenizer_cases.json     strings with the ids of the PyPI `tokenizers` package (and of llama.cpp
                           through llama-cpp-python when it is installed)
  spm_test.model           a small SentencePiece BPE model (byte fallback) trained here
  spm_cases.json           its vocab/scores/types and the ids `sentencepiece` gives for strings

Usage: .venv/bin/python tests/tools/make_tokenizer_cases.py [--model PATH] [--out DIR]
Needs: gguf, tokenizers, sentencepiece (pip); llama-cpp-python optional.
"""

import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_gguf_tokenizer(path):
    from gguf import GGUFReader

    r = GGUFReader(path)

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    return {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre", "default"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_types": get("tokenizer.ggml.token_type", []),
        "merges": get("tokenizer.ggml.merges", []),
        "bos_id": get("tokenizer.ggml.bos_token_id", -1),
        "eos_id": get("tokenizer.ggml.eos_token_id", -1),
        "unk_id": get("tokenizer.ggml.unknown_token_id", -1),
        "pad_id": get("tokenizer.ggml.padding_token_id", -1),
        "add_bos": bool(get("tokenizer.ggml.add_bos_token", False)),
        "add_space_prefix": bool(get("tokenizer.ggml.add_space_prefix", False)),
    }


def build_hf_tokenizer_json(g):
    """SmolLM2's tokenizer.json: byte-level BPE, Digits + ByteLevel pre-tokenizer."""
    vocab = {tok: i for i, tok in enumerate(g["tokens"])}
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (tok, t) in enumerate(zip(g["tokens"], g["token_types"])) if t == 3
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": g["merges"],
        },
    }


def test_strings():
    s = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "a", "Hello", "Hello world",
        "Hello, world!", " Hello world", "Hello world ", "Hello  world", "Hello   world",
        "Hello    world   ", "hello\tworld", "hello\t\tworld", "line1\nline2", "line1\n\nline2",
        "line1\r\nline2\r\n", "trailing newline\n", "   leading spaces", "\n\n\nthree newlines",
        "tabs\t\t\tand spaces   mixed \t \n end",
        "I'm", "you're", "we've", "she'll", "he'd", "it's", "don't", "I'M", "YOU'RE", "We'Ve",
        "can't won't shouldn't", "rock 'n' roll", "'s 't 're", "''", "'", "the dog's bone",
        "0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159", "-273.15", "1e10",
        "1,000,000", "$1,234.56", "2024-01-15", "12:34:56", "version 1.2.3-rc4", "0x1F2E3D",
        "123456789012345678901234567890", "phone: +1 (555) 123-4567", "room 101b", "a1b2c3",
        "٣٤٥ Arabic-Indic digits", "१२३ Devanagari digits", "Ⅻ roman numeral ½ ¾ ²",
        "The quick brown fox jumps over the lazy dog.",
        "THE QUICK BROWN FOX", "CamelCaseIdentifierName", "snake_case_identifier_name",
        "kebab-case-name", "e-mail: someone@example.com", "https://example.com/path?q=1&r=2#frag",
        "Ünïcödé àccénts: café, naïve, résumé, Zürich, São Paulo",
        "Привет, мир! Как дела?", "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم",
        "नमस्ते दुनिया", "こんにちは世界", "カタカナとひらがな", "你好，世界！", "我爱自然语言处理。",
        "안녕하세요 세계", "สวัสดีชาวโลก", "Xin chào thế giới", "Ελληνικά και English μαζί",
        "ქართული ენა", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ runes", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters 𝐀𝐁𝐂",
        "emoji 😀", "😀😃😄😁", "👍🏽 thumbs up with skin tone", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag",
        "👩‍💻 technologist", "🇺🇸🇫🇷🇯🇵 flags", "❤️ heart with VS16", "✈️✈ plane", "🤖 robot: beep",
        "mixed 中文 and English and 😀 emoji", "ZWJ alone: a\u200db", "nbsp:\u00a0here",
        "ideographic space:\u3000here", "em space:\u2003here", "zero width space:\u200bhere",
        "soft\u00adhyphen", "combining e\u0301 vs é", "Å vs A\u030a", "ﬁ ligature", "ｆｕｌｌ width",
        "<|im_start|>user\nHello!<|im_end|>\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|endoftext|>", "text<|endoftext|>text", "<|im_end|><|im_end|>", "<|im_start", "im_start|>",
        "<|im_start|><|im_start|>user", "<repo_name>moa<file_sep>main.cc", "< |im_start| >",
        "<jupyter_code>print(1)<jupyter_output>1<empty_output>",
        "def foo(x):\n    return x * 2\n",
        "class A:\n    def __init__(self):\n        self.x = []  # comment\n",
        "for (int i = 0; i < n; ++i) {\n  sum += a[i];\n}\n",
        "#include <stdio.h>\nint main(void) { printf(\"hi\\n\"); return 0; }\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
        "const f = async (x) => { await g(x?.y ?? 0); };",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
        "<div class=\"a\"><p>Hello &amp; bye</p></div>",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
        "x <- c(1, 2, 3); mean(x)", "echo $HOME && ls -la | grep '.txt' > out.log 2>&1",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
        "if x == 1:\n\tpass\nelif x != 2:\n\t\tpass\n", "    \n    \n", "\t\n\t\n",
        "a = b + c - d * e / f % g ** h // i", "!!!???...,,,;;;:::", "----====____****",
        "((()))[[[]]]{{{}}}", "@#$%^&*~`|\\", "...", "…", "—–-", "\"quoted\" 'single' `back`",
        "«guillemets» „German“ ‚single‘", "¿Qué? ¡Sí!", "100% sure; 50/50 odds", "a_b-c.d/e\\f",
        "Mr. Smith went to Washington D.C. on Jan. 5th.", "U.S.A. vs. U.K.", "e.g. i.e. etc.",
        "word" * 30, " ".join(["token"] * 40), "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "ab" * 40, "\n" * 20, " " * 33, "\t" * 9, "😀" * 12, "中" * 25, "9" * 64,
        "a\u0085b next line", "a\u2028b line separator", "a\u000bb\u000cc vertical tab formfeed",
        "x\u0000y nul", "bell\u0007", "\u00ff\u00fe\u00fd high latin-1",
    ]
    rng = random.Random(1234)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", "      \t\n", ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
        "éèêëàâäôöûüçñßøåæœ", "абвгдежзийклмнопрстуфхцчшщъыьэюя", "αβγδεζηθικλμνξοπρστυφχψω",
        "的一是不了人我在有他这为之大来以个中上们", "あいうえおかきくけこ", "가나다라마바사아자차",
        "😀😂🥲🤔👍🏻👨‍👩‍👧🎉🔥✨", "\u200d\u200b\u00a0\u3000\u2003",
    ]
    for _ in range(140):
        n = rng.randint(1, 40)
        chosen = rng.sample(pools, rng.randint(1, 4))
        s.append("".join(rng.choice(rng.choice(chosen)) for _ in range(n)))
    words = ["the", "model", "token", "is", "über", "naïve", "数据", "😀", "42", "3.5", "don't",
             "x", "  ", "\n", "\t", "<|im_end|>", "foo()", "==", "Δ", "…", "ID", "café"]
    for _ in range(60):
        s.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 14))))
    return s


def make_spm(out_dir, strings):
    import sentencepiece as spm

    rng = random.Random(99)
    base = ("the quick brown fox jumps over the lazy dog while a small model learns to split "
            "words into pieces and numbers like 123 and 4567 appear now and then with café "
            "naïve résumé Zürich and some straße").split()
    lines = []
    for _ in range(400):
        lines.append(" ".join(rng.choice(base) for _ in range(rng.randint(3, 12))))
    train_txt = os.path.join(out_dir, "spm_train.txt")
    with open(train_txt, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    prefix = os.path.join(out_dir, "spm_test")
    spm.SentencePieceTrainer.train(
        input=train_txt, model_prefix=prefix, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    cases = [{"text": t, "ids": sp.encode(t)} for t in strings]
    data = {"model": "llama", "tokens": tokens, "scores": scores, "token_types": types,
            "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(),
            "add_space_prefix": True, "cases": cases}
    with open(os.path.join(out_dir, "spm_cases.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.remove(train_txt)
    os.remove(prefix + ".vocab")
    return len(cases)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(REPO, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(REPO, "tests/data/generated"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    from tokenizers import Tokenizer

    g = read_gguf_tokenizer(args.model)
    with open(os.path.join(args.out, "smollm2_gguf_vocab.json"), "w", encoding="utf-8") as f:
        json.dump(g, f, ensure_ascii=False)
    tj_path = os.path.join(args.out, "smollm2_tokenizer.json")
    with open(tj_path, "w", encoding="utf-8") as f:
        json.dump(build_hf_tokenizer_json(g), f, ensure_ascii=False)
    tok = Tokenizer.from_file(tj_path)

    try:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    except Exception as e:  # llama-cpp-python is an optional second oracle
        print(f"llama.cpp oracle unavailable ({e}); writing tokenizers ids only", file=sys.stderr)
        llm = None

    strings = test_strings()
    cases = []
    for text in strings:
        c = {"text": text, "ids": tok.encode(text, add_special_tokens=False).ids}
        if llm is not None:
            c["llama_cpp_ids"] = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if "<" in text:  # special-token text encoded as plain text (parse_special = false)
            tok.encode_special_tokens = True
            c["ids_no_special"] = tok.encode(text, add_special_tokens=False).ids
            tok.encode_special_tokens = False
        cases.append(c)
    with open(os.path.join(args.out, "tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, indent=0)
    n_spm = make_spm(args.out, strings)
    print(f"wrote {len(cases)} BPE cases, {n_spm} SentencePiece cases to {args.out}")


if __name__ == "__main__":
    main()
