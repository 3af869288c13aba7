"""Mask2Former (pure PyTorch): deformable pixel decoder, masked-attention decoder, Hungarian set criterion."""

from dgss.models.heads.mask2former.head import Mask2FormerHead

__all__ = ["Mask2FormerHead"]
