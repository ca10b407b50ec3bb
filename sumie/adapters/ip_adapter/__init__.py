"""IP-Adapter (Ye et al. 2023): image prompts through decoupled cross-attention, with the CLIP image encoder.

Files: :mod:`.files`; CLIP preprocessing: :mod:`.images`; projections: :mod:`.projection`; the UNet hook:
:mod:`.hook`; request units: :mod:`.units`.
"""

from sumie.adapters.ip_adapter.files import IPAdapterModel, IPAdapterSpec, load_image_encoder, load_ip_adapter
from sumie.adapters.ip_adapter.hook import IPAdapterHook, cross_attention_sites, image_tokens
from sumie.adapters.ip_adapter.images import clip_preprocess

__all__ = ["IPAdapterHook", "IPAdapterModel", "IPAdapterSpec", "clip_preprocess", "cross_attention_sites",
           "image_tokens", "load_image_encoder", "load_ip_adapter"]
