from drlora_serve.models.registry import get_model_class, register_model, supported_model_types

__all__ = ["get_model_class", "register_model", "supported_model_types"]
