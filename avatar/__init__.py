"""Animatable human avatars by differentiable rendering."""
