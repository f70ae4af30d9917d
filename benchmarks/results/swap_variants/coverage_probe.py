"""Vocabulary coverage from outside the training text (2 CPU cores, 2026-11-30, session 5): pick 1024
standard-library docstring sentences (docs.json: docstring_sentences() of sequential_probe.py, dumped)
greedily by the docstring frequency of the tokens they add that the training sentences lack. The
held-out texts are used only to report how many of their unseen tokens the choice covers. The
chosen texts were then added to the training texts for a 3.5-minute run (runs_sequential.txt).
"""
import json, collections
from transformers import AutoTokenizer
from lrkd_fast.data import *
tok = AutoTokenizer.from_pretrained(packaged_minilm_path())
train, held = split_texts(pydoc_sentences(), 512)
docs = json.load(open("docs.json"))
ids = lambda t: set(tok(t, add_special_tokens=False)["input_ids"])
vtrain = set().union(*map(ids, train))
dsets = [ids(d) for d in docs]
freq = collections.Counter(t for s in dsets for t in s if t not in vtrain)
covered, chosen = set(), []
N = 1024
# greedy: most uncovered new-token frequency mass per sentence
import heapq
gain = lambda i: sum(freq[t] for t in dsets[i] - vtrain - covered)
heap = [(-gain(i), i) for i in range(len(docs))]; heapq.heapify(heap)
while len(chosen) < N and heap:
    g, i = heapq.heappop(heap)
    g2 = gain(i)
    if g2 != -g:
        heapq.heappush(heap, (-g2, i)); continue
    if g2 == 0: break
    chosen.append(i); covered |= dsets[i] - vtrain
vheld_new = set().union(*map(ids, held)) - vtrain
print("train vocab", len(vtrain), "held-only tokens", len(vheld_new), "covered by chosen", len(vheld_new & covered), "chosen", len(chosen))
json.dump([docs[i] for i in chosen], open("cover.json", "w"))
