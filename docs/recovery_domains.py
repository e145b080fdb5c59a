# Perplexity ratios of the training-free and recovered exports of `make demo` on three kinds of text (README,
# Limitations). Run from the repository root after `make demo demo-quick`: .venv/bin/python docs/recovery_domains.py
import sys

import torch

sys.path.insert(0, '.')
from convert.data import load_texts, token_windows
from convert.recover import batch_rows
from eval.perplexity import load_model, perplexity
teacher, tok = load_model('smollm2-135m')
rec, _ = load_model('out/smollm2-135m-mla-recovered')
base, _ = load_model('out/smollm2-135m-mla')
brown = token_windows(tok, load_texts('brown'), 512, None, seed=0)
used = set(torch.cat([batch_rows(s, 4, len(brown), 0) for s in range(140)]).tolist())
held = [i for i in range(len(brown)) if i not in used][::40][:16]
sets = {'brown (held-out windows)': brown[held], 'pydoc': token_windows(tok, load_texts('pydoc'), 512, 16, seed=0),
        'bbc:business': token_windows(tok, load_texts('bbc:business'), 512, 16, seed=0)}
for name, w in sets.items():
    t = perplexity(teacher, w, 4, desc='t'); r = perplexity(rec, w, 4, desc='r'); b = perplexity(base, w, 4, desc='b')
    print(f"{name}: original {t:.2f} | training-free {b/t:.3f}x | recovered {r/t:.3f}x", flush=True)
