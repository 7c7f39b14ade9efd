"""Integrations of fastlm's kernels into other libraries' models.

``fastlm.integrations.transformers``: the ``"fastlm"`` attention implementation for Hugging Face
transformers models, and :func:`~fastlm.integrations.transformers.apply` that puts fastlm's
kernels into one transformers model instance. Importing ``fastlm`` never imports these modules.
"""
