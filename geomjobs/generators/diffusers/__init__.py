"""diffusers (Flax) generators: ``diffusers-vae-decoder`` and ``diffusers-unet`` (docs/jobs.md),
and the diffusers VAE's encoder (:func:`geomjobs.generators.encoders.diffusers_vae_encoder`).

Weights load from a diffusers model folder on local disk or on gs:// (copied once into a local
cache, :func:`folders.local_model_folder`): Flax weights (``diffusion_flax_model.msgpack``) through
the real ``from_pretrained`` of diffusers' Flax classes (``FlaxAutoencoderKL``,
``FlaxUNet2DConditionModel``), or diffusers-format PyTorch weights
(``diffusion_pytorch_model.safetensors``, what nearly every public checkpoint ships) read without
torch and mapped onto the same Flax classes (:mod:`.pytorch_weights`); a folder with both loads
the Flax ones. Nothing is downloaded from a hub. Latents are channels-first ``(C, h, w)``, as
diffusers takes them.

- :mod:`.folders`  the diffusers import, model folders, loading, dtypes (:class:`Numerics`), remat
- :mod:`.pytorch_weights`  PyTorch safetensors folders: the key map and the reader; :mod:`.pytorch_write`: :func:`write_pytorch_folder`
- :mod:`.vae`      ``diffusers-vae-decoder``
- :mod:`.unet`     ``diffusers-unet`` (:func:`unet_output`, :func:`as_prediction`)
- :mod:`.prompts`  prompt embeddings and classifier-free guidance (:class:`Conditioning`)
- :mod:`.sdxl`     SDXL's added conditioning (pooled embeddings, micro-conditions) for ``text_time`` UNets
- :mod:`.random_weights`  random weights for configs (tests, benchmarks)

diffusers' Flax classes exist up to diffusers 0.39.x (removed in 0.40): ``pip install
'geomjobs[diffusers]'``. PyTorch ``.bin`` pickles need torch and are refused with a message
saying so. Importing this package does not import diffusers.
"""
from geomjobs.generators.diffusers.folders import Numerics, cast_params, local_model_folder, with_remat
from geomjobs.generators.diffusers.prompts import Conditioning, load_prompt_embeddings
from geomjobs.generators.diffusers.pytorch_write import write_pytorch_folder
from geomjobs.generators.diffusers.random_weights import module_random_params, random_params
from geomjobs.generators.diffusers.unet import Target, as_prediction, unet_from_module, unet_generator, unet_output
from geomjobs.generators.diffusers.vae import vae_decoder_from_module, vae_decoder_generator

__all__ = ["Conditioning", "Numerics", "Target", "as_prediction", "cast_params", "load_prompt_embeddings",
           "local_model_folder", "module_random_params", "random_params", "unet_from_module", "unet_generator",
           "unet_output", "vae_decoder_from_module", "vae_decoder_generator", "with_remat", "write_pytorch_folder"]
