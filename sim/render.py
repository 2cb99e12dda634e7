"""Fast offscreen rendering of several fixed cameras from one GL context.

One OpenGL context, one ``MjrContext`` and one ``MjvScene`` serve all cameras: each camera
renders into its own corner of the shared offscreen buffer, and colour and depth come back
from a single read. With the scene's fast visual settings (no shadows, no multisampling) a
96x96 plus a 64x64 frame cost well under 2 ms together on a CPU with Mesa's EGL.

The GL backend follows ``MUJOCO_GL`` when it is set (it must be set before ``mujoco`` is
first imported); when it is unset, EGL is used, which works headless.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

import mujoco
import numpy as np

from dreamrt.errors import UserError


@dataclass(frozen=True)
class CameraSpec:
    name: str  # an MJCF camera name
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8 or self.height > 2048 or self.width > 2048:
            raise UserError(
                f"camera {self.name!r}: image size {self.height}x{self.width} is out of range; "
                "expected heights and widths between 8 and 2048 pixels."
            )


def strip_size(cameras: list[CameraSpec]) -> tuple[int, int]:
    """(width, height) of the offscreen buffer that holds ``cameras`` side by side."""
    return sum(c.width for c in cameras), max(c.height for c in cameras)


@dataclass
class CameraImages:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray | None  # (H, W, 1) float32 metres along the optical axis
    segmentation: np.ndarray | None  # (H, W, 1) int32 body id, -1 where no geom is seen


def _load_triton_before_gl() -> None:
    """Load Triton's native library now if it is installed, before any GL context exists.

    Mesa's software renderer (EGL / OSMesa) loads its own LLVM; Triton's ``libtriton`` carries
    another, and loading it after Mesa's crashes the process (a segfault inside the import,
    reached e.g. when torch's optimizer first imports ``torch._dynamo`` in a process that has
    already rendered). In the other order both work. It costs ~0.2 s once and never imports torch.
    """
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    try:
        importlib.import_module("triton")
    except Exception:  # a broken Triton install must not stop rendering; torch reports it later
        pass


def _gl_context(width: int, height: int):
    _load_triton_before_gl()
    backend = os.environ.get("MUJOCO_GL", "").strip().lower()
    if backend:
        from mujoco import gl_context

        return gl_context.GLContext(width, height)
    from mujoco.egl import GLContext  # headless default

    return GLContext(width, height)


class CameraRig:
    """Renders a fixed list of cameras of one model; call :meth:`render` with fresh data."""

    def __init__(self, model: mujoco.MjModel, cameras: list[CameraSpec], depth: bool, segmentation: bool):
        self._model = model
        self._cameras = list(cameras)
        self._depth = depth
        self._segmentation = segmentation
        # Cameras sit side by side in one strip of the offscreen buffer, so one readback (one GPU
        # sync, the expensive part on a software renderer) serves them all.
        buf_w, buf_h = model.vis.global_.offwidth, model.vis.global_.offheight
        need_w, need_h = strip_size(self._cameras)
        if need_w > buf_w or need_h > buf_h:
            raise UserError(
                f"cameras {[c.name for c in self._cameras]} need a {need_h}x{need_w} offscreen buffer but the "
                f"model's is {buf_h}x{buf_w}; build the scene with offscreen sizes from strip_size()."
            )
        self._cam_ids = []
        for cam in self._cameras:
            cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, cam.name)
            if cid < 0:
                raise UserError(f"camera {cam.name!r} is not in the model.")
            self._cam_ids.append(cid)
        self._gl = _gl_context(buf_w, buf_h)
        self._gl.make_current()
        self._ctx = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._ctx)
        self._ctx.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=max(200, 2 * model.ngeom))
        self._option = mujoco.MjvOption()
        self._mjv_cams = []
        for cid in self._cam_ids:
            c = mujoco.MjvCamera()
            c.type = mujoco.mjtCamera.mjCAMERA_FIXED
            c.fixedcamid = cid
            self._mjv_cams.append(c)
        self._rects = []
        x = 0
        for cam in self._cameras:
            self._rects.append(mujoco.MjrRect(x, 0, cam.width, cam.height))
            x += cam.width
        self._strip = mujoco.MjrRect(0, 0, need_w, need_h)
        extent = model.stat.extent
        self._znear = model.vis.map.znear * extent
        self._zfar = model.vis.map.zfar * extent
        self._geom_body = model.geom_bodyid.astype(np.int32)
        self._segid_cache: np.ndarray | None = None

    @property
    def cameras(self) -> list[CameraSpec]:
        return list(self._cameras)

    def render(self, data: mujoco.MjData) -> dict[str, CameraImages]:
        """Images of every camera for the state in ``data`` (kinematics must be current)."""
        assert self._ctx is not None, "render() after close()"
        self._gl.make_current()
        for mcam, rect in zip(self._mjv_cams, self._rects):
            mujoco.mjv_updateScene(
                self._model, data, self._option, None, mcam, mujoco.mjtCatBit.mjCAT_ALL, self._scene
            )
            mujoco.mjr_render(rect, self._scene, self._ctx)
        rgb = np.empty((self._strip.height, self._strip.width, 3), np.uint8)
        depth = np.empty((self._strip.height, self._strip.width), np.float32) if self._depth else None
        mujoco.mjr_readPixels(rgb, depth, self._strip, self._ctx)
        seg = self._render_segmentation(data) if self._segmentation else None
        out = {}
        for cam, rect in zip(self._cameras, self._rects):
            # OpenGL rows run bottom-up; each camera fills the bottom-left of its slot.
            rows, cols = slice(cam.height - 1, None, -1), slice(rect.left, rect.left + cam.width)
            out[cam.name] = CameraImages(
                rgb=np.ascontiguousarray(rgb[rows, cols]),
                depth=None if depth is None else self._linear_depth(depth[rows, cols])[..., None],
                segmentation=None if seg is None else np.ascontiguousarray(seg[rows, cols])[..., None],
            )
        return out

    def _linear_depth(self, raw: np.ndarray) -> np.ndarray:
        # The context reads reversed depth (mjDEPTH_ZEROFAR: 1 at the near plane, 0 at the far
        # plane); undo the perspective mapping to metres along the optical axis.
        near, far = self._znear, self._zfar
        z = raw.astype(np.float64)
        return (near * far / (near + z * (far - near))).astype(np.float32)

    def _render_segmentation(self, data: mujoco.MjData) -> np.ndarray:
        """(strip H, strip W) body ids of the whole strip; -1 where no geom is seen."""
        flags = self._scene.flags
        ids = np.empty((self._strip.height, self._strip.width, 3), np.uint8)
        try:
            flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = True
            flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = True
            for mcam, rect in zip(self._mjv_cams, self._rects):
                mujoco.mjv_updateScene(
                    self._model, data, self._option, None, mcam, mujoco.mjtCatBit.mjCAT_ALL, self._scene
                )
                mujoco.mjr_render(rect, self._scene, self._ctx)
            mujoco.mjr_readPixels(ids, None, self._strip, self._ctx)
        finally:
            flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = False
            flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = False
        table = self._segid_table()
        segid = (
            ids[..., 0].astype(np.int64)
            | (ids[..., 1].astype(np.int64) << 8)
            | (ids[..., 2].astype(np.int64) << 16)
        )
        # Pixels outside a camera's slot keep the clear colour (segid 0 -> -1).
        return table[np.clip(segid, 0, len(table) - 1)]

    def _segid_table(self) -> np.ndarray:
        """Body id per segmentation id (1 + index of the drawn scene geom; 0 is background).

        The scene's geom list depends only on the model and the fixed options, not on the
        state or the camera, so the table is built once (and again if the list ever changes).
        """
        n = self._scene.ngeom
        if self._segid_cache is None or len(self._segid_cache) != n + 1:
            table = np.full(n + 1, -1, np.int32)
            for i in range(n):
                g = self._scene.geoms[i]
                if g.segid >= 0 and g.objtype == mujoco.mjtObj.mjOBJ_GEOM:
                    table[g.segid + 1] = self._geom_body[g.objid]
            self._segid_cache = table
        return self._segid_cache

    def close(self) -> None:
        if self._ctx is not None:
            self._gl.make_current()
            self._ctx.free()
            self._ctx = None
            self._gl.free()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down GL already
            pass
