"""kvmcolo: a userspace KVM checkpointer that keeps a guest alive across host failure."""

__version__ = "0.1.0"
