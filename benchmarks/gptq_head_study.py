"""Study for the next step on int4 decode: what a GPTQ-calibrated int4 LM head would cost in quality.

    python benchmarks/gptq_head_study.py

SmolLM2's head is tied to its embedding table, and the exporter stores the two in one initializer; an int4
head is 8-10% faster to decode than the int8 default (docs/BENCHMARKS.md). This computes, with the fp32
PyTorch reference and the exact int4-GPTQ decoder weights an export writes (int8 embedding), the quality of
three heads on the first 1024 evaluation tokens: int8 RTN (today's default), int4 RTN, and int4 GPTQ
calibrated on the final norm's outputs (the head's inputs) over the shipped calibration sequences. The
head is applied to the quantized model's own final hidden states, so only the head differs between rows.
"""

import numpy as np, torch
from edgecpm.checkpoint import open_checkpoint
from edgecpm.resources import default_model_path
from edgecpm.models import reference_model
from edgecpm.quant.plan import quantized_weights
from edgecpm.quant.spec import QuantSpec
from edgecpm.quant.calibrate import calibration_text, calibration_sequences, gptq_quantize
from edgecpm.quant.formats import quantize_rtn
from edgecpm.quant.quality import evaluation_text, compare
from edgecpm.text import TextTokenizer
torch.set_num_threads(2)
ck = open_checkpoint(default_model_path()); tok = TextTokenizer.from_checkpoint(ck.tokenizer)
table = ck.tensors["model.embed_tokens.weight"].numpy(np.float32)
# head-input Hessian from the fp32 model
fp = reference_model(ck)
H = torch.zeros(576, 576); rows = 0
def hook(m, a, out):
    global H, rows
    x = out.detach().reshape(-1, 576).float(); H += x.T @ x; rows += x.shape[0]
h = fp.model.norm.register_forward_hook(hook)
with torch.no_grad():
    for s in calibration_sequences(tok.encode(calibration_text())):
        fp(torch.from_numpy(s)[None], fp.new_cache())
h.remove()
H = (H / rows).numpy()
ids = np.asarray(tok.encode(evaluation_text())[:1024], np.int64)
with torch.no_grad(): ref = fp(torch.from_numpy(ids)[None])[0, :-1].numpy()
w = quantized_weights(ck, QuantSpec("int4", method="gptq"))  # int8 tables
model = reference_model(ck, w)
captured = {}
h = model.model.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("x", out.detach()[0].numpy()))
with torch.no_grad(): base = model(torch.from_numpy(ids)[None])[0, :-1].numpy()
h.remove()
x = captured["x"][:-1]
heads = {"int8 rtn (default)": None,
         "int4 rtn": quantize_rtn(table, 4, 32).dequantize(),
         "int4 gptq": gptq_quantize(table, H, 4, 32, damping=0.1).dequantize(),
         "int4 gptq d0.01": gptq_quantize(table, H, 4, 32, damping=0.01).dequantize()}
for label, head in heads.items():
    logits = base if head is None else x @ head.T
    r = compare(ref, logits, ids)
    print(f"{label:20s} ppl {r.perplexity_increase:+.1%} kl {r.mean_kl:.4f} top1 {r.top1_agreement:.1%}", flush=True)
