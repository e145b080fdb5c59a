# Perplexity ratios of exports to the original on several kinds of text (README, Recovery; docs/recovery-smollm2-135m.md).
# Run from the repository root, e.g. after `make demo demo-quick`:
#   .venv/bin/python docs/recovery_domains.py out/smollm2-135m-mla out/smollm2-135m-mla-recovered
# Kinds: BBC tech news (the validation text, never trained on), Python 3.11 library reference (.rst sources of the
# Debian package python3.11-doc, downloaded once with `apt-get download` into the user cache; never trained on),
# Brown windows outside the recipe's training windows, and pydoc (trained on by recipes/smollm2-135m.yaml).
import argparse
import glob
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, '.')
from convert.cache import cache_dir
from convert.config import load_recipe
from convert.data import load_sources, load_texts, mixed_windows, token_windows
from convert.recover.config import RecoverConfig
from eval.perplexity import load_model, perplexity

parser = argparse.ArgumentParser()
parser.add_argument('models', nargs='+')
parser.add_argument('--recipe', default='recipes/smollm2-135m.yaml')
parser.add_argument('--windows', type=int, default=16)
args = parser.parse_args()
torch.manual_seed(0)


def python_docs() -> list[str]:
    root = cache_dir('data', 'python3.11-doc')
    lib = root / 'usr/share/doc/python3.11/html/_sources/library'
    if not lib.is_dir():
        subprocess.run(['apt-get', 'download', 'python3.11-doc'], cwd=root, check=True)
        deb = sorted(root.glob('python3.11-doc_*.deb'))[-1]
        subprocess.run(['dpkg-deb', '-x', str(deb), str(root)], check=True)
    return [Path(p).read_text(errors='replace') for p in sorted(glob.glob(f'{lib}/*.rst.txt'))]


teacher, tok = load_model('smollm2-135m')
recover = RecoverConfig(**load_recipe(args.recipe, 'recover', RecoverConfig))
n = args.windows
brown = token_windows(tok, load_texts('brown'), 512, None, seed=0)
trained = mixed_windows(tok, load_sources(recover.data), recover.seq_len, None, seed=recover.seed)
seen = {tuple(r) for r in trained.tolist()}
unseen = torch.stack([w for w in brown if tuple(w.tolist()) not in seen])
sets = {
    'BBC tech news (validation text)': token_windows(tok, load_texts('bbc:tech'), 512, n, seed=1),
    'Python 3.11 library docs (held out)': token_windows(tok, python_docs(), 512, n, seed=0),
    'Brown, windows not trained on': unseen[torch.randperm(len(unseen))[:n].sort().values],
    'pydoc topics (in the training mix)': token_windows(tok, load_texts('pydoc'), 512, n, seed=5),
}
models = {m: load_model(m)[0] for m in args.models}
print('| text | original ppl | ' + ' | '.join(args.models) + ' |')
print('|---|---|' + '---|' * len(args.models))
for name, w in sets.items():
    t = perplexity(teacher, w, 4, desc='original')
    ratios = [perplexity(m, w, 4, desc=p) / t for p, m in models.items()]
    print(f'| {name} | {t:.2f} | ' + ' | '.join(f'{r:.3f}x' for r in ratios) + ' |', flush=True)
