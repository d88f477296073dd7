"""The standard stages. Each is a small class with declared reads, writes and callbacks."""
from .decoding import DecodingStage
from .denoising import DenoisingStage
from .diffusers_pipeline import DiffusersPipelineStage
from .image_encoding import ImageEncodingStage
from .image_noising import ImageNoisingStage
from .input_validation import InputValidationStage
from .latent_preparation import LatentPreparationStage
from .mask_preparation import MaskPreparationStage
from .text_encoding import EncoderConfig, TextEncodingStage
from .timestep_preparation import TimestepPreparationStage

STANDARD_STAGES = (
    InputValidationStage,
    TextEncodingStage,
    ImageEncodingStage,
    LatentPreparationStage,
    MaskPreparationStage,
    TimestepPreparationStage,
    ImageNoisingStage,
    DenoisingStage,
    DecodingStage,
    DiffusersPipelineStage,
)

__all__ = [s.__name__ for s in STANDARD_STAGES] + ["EncoderConfig", "STANDARD_STAGES"]
