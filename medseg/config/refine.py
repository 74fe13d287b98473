"""Frozen, serialisable settings of the refine stage: the dense CRF and the post-processing.

They load from the ``refine:`` section of ``pipelines/*.yaml`` (:class:`RefineConfig`) and round-trip
through YAML and JSON, so a bundle can store the post-processing chosen on validation data.

Examples:
    >>> cfg = DenseCRFConfig(iterations=3, compatibility=[[0, 1], [1, 0]])
    >>> cfg.intensity_sigmas(2)
    (0.5, 0.5)
    >>> PostprocessConfig.model_validate({"labels": {"1": {"keep_largest": True}}}).for_label(1).keep_largest
    True
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

from medseg.config.base import FrozenModel


class DenseCRFConfig(FrozenModel):
    """A fully connected CRF (Krähenbühl & Koltun 2011) over the stitched probabilities.

    Kernel widths are in millimetres and converted with the volume's spacing; intensity widths are in
    the units of the normalised image. The energy of a labelling ``x`` is
    ``sum_i -log p_i(x_i) + sum_{i<j} mu(x_i, x_j) [w_s k_s(i, j) + w_b k_b(i, j)]`` with
    ``k_s = exp(-|p_i - p_j|^2 / 2 spatial_sigma_mm^2)`` and
    ``k_b = exp(-|p_i - p_j|^2 / 2 bilateral_sigma_mm^2 - sum_c |I_ic - I_jc|^2 / 2 intensity_sigma_c^2)``,
    each kernel normalised symmetrically (as pydensecrf's default ``NORMALIZE_SYMMETRIC``).

    Attributes:
        enabled: Run the CRF at all.
        iterations: Mean-field iterations.
        spatial_sigma_mm: Width of the smoothness (position-only) kernel.
        spatial_weight: Its weight ``w_s`` (0 switches it off).
        bilateral_sigma_mm: Positional width of the appearance kernel.
        intensity_sigma: Intensity width of the appearance kernel: one for every channel, or one per
            channel.
        bilateral_weight: Its weight ``w_b`` (0 switches it off).
        compatibility: ``"potts"`` (``mu = 1 - identity``) or a ``K x K`` matrix ``mu[l][m]``: the cost of
            labels ``l`` and ``m`` at similar voxels (symmetrised).
        min_probability: Probabilities are clipped to at least this before the log (pydensecrf's
            ``unary_from_softmax`` clips to ``1e-5``).
        roi_margin_mm: Refine only the box around the predicted foreground (labels other than 0)
            grown by this margin; ``None`` refines the whole volume.
        max_block_voxels: Larger regions are refined slab by slab, each at most about this many voxels
            with its halo, which bounds the memory (about 150 bytes per voxel in 3D).
        halo_widths: Halo around each slab, in kernel widths (of the wider kernel); at least 3.
        threads: CPU threads while refining (the CRF's many short operations suffer when OpenMP threads
            wait for a busy core): 0 chooses, per block, torch's setting for big blocks and one thread
            for blocks under a million voxels or when the load average says the cores are taken (on a
            shared machine, threads that spin-wait for a descheduled partner can make the CRF ten
            times slower); ``n`` uses ``n``. Ignored on CUDA.
    """

    enabled: bool = True
    iterations: Annotated[int, Field(ge=0)] = 5
    spatial_sigma_mm: PositiveFloat = 3.0
    spatial_weight: NonNegativeFloat = 3.0
    bilateral_sigma_mm: PositiveFloat = 10.0
    intensity_sigma: PositiveFloat | tuple[PositiveFloat, ...] = 0.5
    bilateral_weight: NonNegativeFloat = 5.0
    compatibility: Literal["potts"] | tuple[tuple[float, ...], ...] = "potts"
    min_probability: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    roi_margin_mm: NonNegativeFloat | None = 20.0
    max_block_voxels: PositiveInt = 8_000_000
    halo_widths: Annotated[float, Field(ge=3.0)] = 3.0
    threads: Annotated[int, Field(ge=0)] = 0

    @field_validator("intensity_sigma")
    @classmethod
    def _check_sigmas(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        if isinstance(value, tuple) and not value:
            msg = "intensity_sigma must hold at least one width, got an empty list"
            raise ValueError(msg)
        return value

    @field_validator("compatibility")
    @classmethod
    def _check_matrix(cls, value: str | tuple[tuple[float, ...], ...]) -> str | tuple[tuple[float, ...], ...]:
        if isinstance(value, tuple):
            k = len(value)
            if k < 2 or any(len(row) != k for row in value):
                shape = f"{k}x{'/'.join(str(len(r)) for r in value)}" if value else "empty"
                msg = f"compatibility must be 'potts' or a square K x K matrix with K >= 2, got {shape}"
                raise ValueError(msg)
        return value

    def intensity_sigmas(self, n_channels: int) -> tuple[float, ...]:
        """One intensity width per image channel.

        Raises:
            ValueError: If a per-channel list does not match ``n_channels``.
        """
        if isinstance(self.intensity_sigma, tuple):
            if len(self.intensity_sigma) == 1:
                return self.intensity_sigma * n_channels
            if len(self.intensity_sigma) != n_channels:
                msg = (
                    f"intensity_sigma must give one width or one per channel ({n_channels}), "
                    f"got {len(self.intensity_sigma)}"
                )
                raise ValueError(msg)
            return self.intensity_sigma
        return (float(self.intensity_sigma),) * n_channels

    @property
    def widest_kernel_mm(self) -> float:
        """The widest positional kernel width in use (sets the halo)."""
        widths = [0.0]
        if self.spatial_weight > 0:
            widths.append(self.spatial_sigma_mm)
        if self.bilateral_weight > 0:
            widths.append(self.bilateral_sigma_mm)
        return max(widths)


class LabelPostprocess(FrozenModel):
    """What post-processing does to one label (applied in this order).

    Attributes:
        keep_largest: Keep only the label's largest connected component.
        min_component_mm3: Remove the label's connected components smaller than this (islands);
            removed voxels become background (0).
        fill_holes: Give the label to background voxels it encloses (holes of its mask).
    """

    keep_largest: bool = False
    min_component_mm3: PositiveFloat | None = None
    fill_holes: bool = False

    @property
    def is_identity(self) -> bool:
        """Whether this does nothing."""
        return not (self.keep_largest or self.min_component_mm3 or self.fill_holes)


class PostprocessConfig(FrozenModel):
    """Per-label post-processing, nnU-Net style, as chosen on validation data.

    Attributes:
        enabled: Apply it at all.
        choose: At the end of training, choose ``labels`` on the validation cases (keeping only
            operations that raise a label's Dice) and store the choice with the model; any ``labels``
            given here are then replaced. ``False`` keeps ``labels`` as written.
        connectivity: ``"face"`` (4/6-connected) or ``"full"`` (8/26-connected) components.
        labels: Operations per label; labels not listed are left alone.
    """

    enabled: bool = True
    choose: bool = True
    connectivity: Literal["face", "full"] = "full"
    labels: dict[PositiveInt, LabelPostprocess] = Field(default_factory=dict)

    def for_label(self, label: int) -> LabelPostprocess:
        """The operations for ``label`` (none if it is not listed)."""
        return self.labels.get(label, LabelPostprocess())


def _crf_off() -> DenseCRFConfig:
    return DenseCRFConfig(enabled=False)


class RefineConfig(FrozenModel):
    """The ``refine:`` section of a pipeline: the dense CRF, then post-processing.

    Without a ``crf:`` entry the CRF is off (it costs about as much as the network on CPU); writing
    one switches it on with the defaults of :class:`DenseCRFConfig` unless it says ``enabled: false``.
    Post-processing is on, chosen on validation data at the end of training.

    Examples:
        >>> RefineConfig().crf.enabled, RefineConfig.model_validate({"crf": {"iterations": 3}}).crf.enabled
        (False, True)
    """

    crf: DenseCRFConfig = Field(default_factory=_crf_off)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)

    def switched(self, crf: bool | None = None, postprocess: bool | None = None) -> RefineConfig:
        """A copy with the CRF and/or post-processing switched on or off (``None``: unchanged)."""
        out = self
        if crf is not None:
            out = out.model_copy(update={"crf": out.crf.model_copy(update={"enabled": crf})})
        if postprocess is not None:
            post = out.postprocess.model_copy(update={"enabled": postprocess})
            out = out.model_copy(update={"postprocess": post})
        return out
