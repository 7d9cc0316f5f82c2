"""Attribution methods, one per file, behind `AttributionMethod` (Hydra targets `caap.methods.<Class>`)."""

from caap.methods.attention_rollout import AttentionRollout
from caap.methods.base import AttributionMethod
from caap.methods.caap import CAAP
from caap.methods.feature_ablation import FeatureAblation
from caap.methods.fullgrad_plus import FullGradPlus
from caap.methods.gaussian_prior import GaussianPrior
from caap.methods.genatt import GenAtt
from caap.methods.gradcam_tokens import GradCAMTokens
from caap.methods.gradient import Gradient
from caap.methods.input_x_gradient import InputXGradient
from caap.methods.integrated_gradients import IntegratedGradients
from caap.methods.kernel_shap import KernelShap
from caap.methods.libragrad import libragrad
from caap.methods.lime import Lime
from caap.methods.occlusion import Occlusion
from caap.methods.random import RandomAttribution
from caap.methods.raw_attention import RawAttention
from caap.methods.rise import RISE
from caap.methods.token_sampling import TokenSampling

__all__ = [
    "CAAP",
    "RISE",
    "AttentionRollout",
    "AttributionMethod",
    "FeatureAblation",
    "FullGradPlus",
    "GaussianPrior",
    "GenAtt",
    "GradCAMTokens",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "KernelShap",
    "Lime",
    "Occlusion",
    "RandomAttribution",
    "RawAttention",
    "TokenSampling",
    "libragrad",
]
