"""Set-up shared by the steering pilot scripts: the judge (cached), model, shipped SAE and a generate+score helper."""
import time, torch, json, re, os, logging
from saelora.adapters.models import load_model
from saelora.adapters.saes import load_sae, shipped_sae
from saelora.adapters.splice_hooks import Splice
from saelora.adapters.steering import read_texts, concept_latents, diffmean, median_norm, decoder_norms, project_direction
from saelora.adapters.edits import LatentEdit, VectorEdit
from saelora.adapters.judge import Judge
from saelora.adapters.steer_score import generate, continuation_ce, reference_ce, score
from saelora.adapters.units import to_raw, SteerScales
from saelora.trainer.concepts import wiki_suite
torch.set_num_threads(2)
def sents(ts):
    out=[]
    for t in ts:
        out += [s for s in re.split(r'(?<=[.!?])\s+', t) if len(s.split())>=5]
    return out
suite = wiki_suite()
if os.path.exists('/tmp/pilot/judge.pt'):
    judge = torch.load('/tmp/pilot/judge.pt', weights_only=False)
else:
    judge = Judge.fit({c: sents(suite.texts(c,"judge")) for c in suite.concepts}, sents(suite.part(suite.negatives,"judge")))
    torch.save(judge, '/tmp/pilot/judge.pt')
MODEL = os.environ.get("M", "smollm2-135m")
lm = load_model(MODEL)
sae = load_sae(lm.model, os.environ.get("SAE") or str(shipped_sae(MODEL)), tokenizer=lm.tokenizer)
sp = Splice(lm.model, [sae], mode="error_term").install()
def run(concept, edits, prompts, prefix="", samples=1, temperature=0.7, seed=0, ref=None, mode="error_term"):
    gens = generate(lm, sp, prompts, edits, mode=mode, samples=samples, max_new=32, temperature=temperature, seed=seed, prefix=prefix)
    sp.remove(); ce = continuation_ce(lm.model, gens); sp.install()
    return gens, score(gens, ce, judge, concept, ref)
def reference(concept):
    sp.remove(); r = reference_ce(lm.model, lm.tokenizer, suite.texts(concept, "test", 48)); sp.install(); return r
