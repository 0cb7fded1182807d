"""Development aid: reference token ids from open_clip's own tokenizer (open_clip_torch 2.24.0 in the
project venv) for every unique caption of the annotation sets plus hand-picked edge cases.
Output: gzip'd lines `caption-as-JSON-string \t id id ... (up to and including EOT or position 77)`."""
import glob, gzip, json, sys
from open_clip.tokenizer import SimpleTokenizer

shared, out = sys.argv[1], sys.argv[2]
tok = SimpleTokenizer()
caps = []
seen = set()
def add(c):
    if c not in seen:
        seen.add(c); caps.append(c)
edge = [
    "Two large ships loaded with cargo were moored on both sides of the gray port.",
    "The airport is very large .", "", "   ", "It's 3 storage-tanks &amp; a   pond",
    "&amp;amp; double escaped &lt;b&gt; &quot;q&quot; &#39;x&#39; &#x41;&#66; &nbsp;nb &copy;",
    "curly \u2018single\u2019 and \u201cdouble\u201d quotes", "ligature \ufb01eld \ufb02ow",
    "fullwidth \uff21\uff22\uff23\uff11\uff12 \u3000space", "caf\u00e9 na\u0308ive \u00c5ngstr\u00f6m",
    "TAB\tand\nnewline\r\nand  many   spaces", "digits 1234567890 and 3.14", "emoji \U0001F600 and \u2014 dash",
    "Chinese \u673a\u573a\u548c\u98de\u673a", "<start_of_text> literal <end_of_text> tokens",
    "CAPITALS And MiXeD we'll they're I'M you've he'd", "a " * 100, "supercalifragilisticexpialidocious " * 10,
    "\u00bfQu\u00e9? \u00a1S\u00ed! \u00e0\u00e9\u00ee\u00f5\u00fc \u00df \u0130stanbul \u03a3\u039f\u03a3",
]
for c in edge: add(c)
n_total = 0
for f in sorted(glob.glob(shared + "/data/annotations/*.json")):
    for im in json.load(open(f))["images"]:
        for s in im["sentences"]:
            n_total += 1
            add(s["raw"]); add(s["raw"].capitalize())
with gzip.open(out, "wt", encoding="utf-8") as g:
    for c in caps:
        ids = tok([c])[0] if False else None
        seq = [tok.encoder["<start_of_text>"]] + tok.encode(c) + [tok.encoder["<end_of_text>"]]
        if len(seq) > 77:
            seq = seq[:77]; seq[-1] = tok.encoder["<end_of_text>"]
        g.write(json.dumps(c) + "\t" + " ".join(map(str, seq)) + "\n")
print("captions in annotation files:", n_total, "unique golden lines:", len(caps))
