"""Layers and models: Module and Parameter, general layers, and the Vision Transformer."""

from minivit.nn.module import Module, ModuleList, Parameter
from minivit.nn.layers import GELU, Dropout, Identity, LayerNorm, Linear
from minivit.nn.vit import Attention, Block, Mlp, PatchEmbed, PatchProjection, VisionTransformer
from minivit.nn.modulation import SelfModulatedLayerNorm
from minivit.nn.gan import ViTDiscriminator, ViTGenerator
from minivit.nn.vae import ViTVAE
from minivit.nn import utils

__all__ = ["Module", "ModuleList", "Parameter", "Linear", "LayerNorm", "GELU", "Dropout", "Identity",
           "PatchEmbed", "PatchProjection", "Attention", "Mlp", "Block", "VisionTransformer",
           "SelfModulatedLayerNorm", "ViTVAE", "ViTGenerator", "ViTDiscriminator", "utils"]
