# setuptools needs this file only for cffi_modules: installing the package
# compiles the KVM bindings against the system's <linux/kvm.h>.
from setuptools import setup

setup(cffi_modules=["kvmcolo/_kvm_build.py:ffibuilder"])
