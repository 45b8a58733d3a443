"""kvd integration for Hugging Face transformers 5.x.

    import kvd_transformers
    from kvd_client import KvdClient

    kvd_transformers.enable(model)               # or from_pretrained(..., attn_implementation="kvd")
    cache = kvd_transformers.KVDCache(KvdClient(), session="chat-42")
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=256)
    cache.persist()                              # the next turn (or process) continues "chat-42"

Per layer, the sink and the recent window stay on the device and are attended exactly; every token is also
appended to the kvd session, which answers top-k partial attention (output + log-sum-exp) over the offloaded
part; the two are merged exactly by log-sum-exp.
"""

from kvd_transformers.attention import NAME, KVDMask, enable, kvd_attention_forward, kvd_mask, register
from kvd_transformers.cache import KVDCache
from kvd_transformers.config import KVDConfig
from kvd_transformers.layer import KVDLayer

register()

__all__ = [
    "NAME",
    "KVDCache",
    "KVDConfig",
    "KVDLayer",
    "KVDMask",
    "enable",
    "kvd_attention_forward",
    "kvd_mask",
    "register",
]
