//! torchvision's ResNet-50/101 trunk (conv1 ... layer4, no pooling or classifier) with
//! DETR's frozen batch norm: the visual backbone of TransVG.
//!
//! Port of torchvision `models/resnet.py` (v1.5 bottleneck: the stride sits on the 3x3
//! `conv2`; <https://github.com/pytorch/vision/blob/v0.29.0/torchvision/models/resnet.py>)
//! wrapped as DETR/TransVG do (`models/visual_model/backbone.py`: `FrozenBatchNorm2d`,
//! `replace_stride_with_dilation=[False, False, dilation]`). Keys are torchvision's
//! (`conv1.weight`, `bn1.*`, `layer{1..4}.{b}.conv{1,2,3}.weight`, `bn{1,2,3}.*`,
//! `downsample.{0.weight, 1.*}`). The frozen batch norms are buffers, not parameters: their
//! `weight`, `bias`, `running_mean` and `running_var` are read detached, so no gradient
//! reaches them ([`is_frozen_buffer`] names them). Convolutions are candle's `conv2d`
//! (NCHW), with a gradient to their weights and input.

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Shape of a ResNet trunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage: `[3, 4, 6, 3]` (ResNet-50), `[3, 4, 23, 3]` (101).
    pub layers: [usize; 4],
    /// Channels of `conv1` and of the first stage's bottleneck (64 in torchvision; the
    /// stages use `width, 2 width, 4 width, 8 width`, expanded 4x at their outputs).
    pub width: usize,
    /// DETR's `--dilation`: the last stage keeps stride 16 and dilates its 3x3 convs.
    #[serde(default)]
    pub dilation: bool,
}

impl ResNetConfig {
    pub fn resnet50() -> Self {
        Self {
            layers: [3, 4, 6, 3],
            width: 64,
            dilation: false,
        }
    }

    pub fn resnet101() -> Self {
        Self {
            layers: [3, 4, 23, 3],
            ..Self::resnet50()
        }
    }

    /// Channels of the last stage's output.
    pub fn out_channels(&self) -> usize {
        self.width * 8 * EXPANSION
    }

    /// Output stride: 32, or 16 with dilation.
    pub fn stride(&self) -> usize {
        if self.dilation {
            16
        } else {
            32
        }
    }

    /// torchvision's name for this depth (`resnet50`, `resnet101`), if it is one.
    pub fn name(&self) -> Option<&'static str> {
        match self.layers {
            [3, 4, 6, 3] => Some("resnet50"),
            [3, 4, 23, 3] => Some("resnet101"),
            [3, 8, 36, 3] => Some("resnet152"),
            _ => None,
        }
    }
}

const EXPANSION: usize = 4;
/// `FrozenBatchNorm2d`'s epsilon (DETR hard-codes it).
const BN_EPS: f64 = 1e-5;

/// Whether a parameter name (below the backbone's prefix or with one) is a frozen batch
/// norm buffer: never trained, so it gets no gradient by design.
pub fn is_frozen_buffer(name: &str) -> bool {
    let Some((module, leaf)) = name.rsplit_once('.') else {
        return false;
    };
    let last = module.rsplit('.').next().unwrap_or(module);
    let is_bn = last.starts_with("bn") || module.ends_with("downsample.1");
    is_bn && matches!(leaf, "weight" | "bias" | "running_mean" | "running_var")
}

/// DETR's `FrozenBatchNorm2d`: `y = x * scale + shift`, `scale = w / sqrt(var + 1e-5)`,
/// `shift = b - mean * scale`, from buffers read detached.
#[derive(Debug, Clone)]
struct FrozenBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl FrozenBatchNorm {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let get = |name: &str, v: f64| vb.get_with_hints(c, name, candle_nn::Init::Const(v));
        Ok(Self {
            weight: get("weight", 1.0)?,
            bias: get("bias", 0.0)?,
            running_mean: get("running_mean", 0.0)?,
            running_var: get("running_var", 1.0)?,
        })
    }
}

impl Module for FrozenBatchNorm {
    /// `x: [B, C, H, W]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // computed per call: loading weights into the variables later must take effect
        let scale =
            (self.weight.detach() * (self.running_var.detach() + BN_EPS)?.sqrt()?.recip()?)?;
        let shift = (self.bias.detach() - (self.running_mean.detach() * &scale)?)?;
        let c = scale.dim(0)?;
        x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?)
    }
}

/// A bias-free convolution (torchvision's `conv1x1`/`conv3x3`/the 7x7 stem).
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Result<Self> {
        // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let weight = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        Ok(Self {
            weight,
            stride,
            padding,
            dilation,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, self.dilation, 1)
    }
}

/// torchvision's `Bottleneck` (expansion 4).
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: Conv,
    bn1: FrozenBatchNorm,
    conv2: Conv,
    bn2: FrozenBatchNorm,
    conv3: Conv,
    bn3: FrozenBatchNorm,
    downsample: Option<(Conv, FrozenBatchNorm)>,
}

impl Bottleneck {
    fn new(
        vb: VarBuilder,
        cin: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<Self> {
        let cout = planes * EXPANSION;
        let downsample = if stride != 1 || cin != cout {
            Some((
                Conv::new(vb.pp("downsample.0"), cin, cout, 1, stride, 0, 1)?,
                FrozenBatchNorm::new(vb.pp("downsample.1"), cout)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), cin, planes, 1, 1, 0, 1)?,
            bn1: FrozenBatchNorm::new(vb.pp("bn1"), planes)?,
            conv2: Conv::new(
                vb.pp("conv2"),
                planes,
                planes,
                3,
                stride,
                dilation,
                dilation,
            )?,
            bn2: FrozenBatchNorm::new(vb.pp("bn2"), planes)?,
            conv3: Conv::new(vb.pp("conv3"), planes, cout, 1, 1, 0, 1)?,
            bn3: FrozenBatchNorm::new(vb.pp("bn3"), cout)?,
            downsample,
        })
    }
}

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?)?.relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?)?.relu()?;
        let h = self.bn3.forward(&self.conv3.forward(&h)?)?;
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?)?,
            None => x.clone(),
        };
        (h + identity)?.relu()
    }
}

/// The trunk: `conv1 -> bn1 -> relu -> maxpool -> layer1..layer4`.
#[derive(Debug, Clone)]
pub struct ResNet {
    conv1: Conv,
    bn1: FrozenBatchNorm,
    stages: Vec<Vec<Bottleneck>>,
    cfg: ResNetConfig,
}

impl ResNet {
    pub fn new(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        let w = cfg.width;
        let mut cin = w;
        let mut dilation = 1;
        let mut stages = Vec::with_capacity(4);
        for (i, &blocks) in cfg.layers.iter().enumerate() {
            let planes = w << i;
            let mut stride = if i == 0 { 1 } else { 2 };
            // torchvision `_make_layer(dilate=True)`: the first block keeps the previous
            // dilation with stride 1, the later ones use the doubled dilation
            let previous = dilation;
            if i == 3 && cfg.dilation {
                dilation *= stride;
                stride = 1;
            }
            let vb = vb.pp(format!("layer{}", i + 1));
            let mut stage = Vec::with_capacity(blocks);
            for b in 0..blocks {
                let (s, d) = if b == 0 {
                    (stride, previous)
                } else {
                    (1, dilation)
                };
                stage.push(Bottleneck::new(vb.pp(b.to_string()), cin, planes, s, d)?);
                cin = planes * EXPANSION;
            }
            stages.push(stage);
        }
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), 3, w, 7, 2, 3, 1)?,
            bn1: FrozenBatchNorm::new(vb.pp("bn1"), w)?,
            stages,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }
}

impl Module for ResNet {
    /// `x: [B, 3, H, W]` -> `[B, 32 width, H / stride, W / stride]` (H, W multiples of 32).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.bn1.forward(&self.conv1.forward(x)?)?.relu()?; // [B, w, H/2, W/2]
        let mut x = max_pool_3x3_s2(&x)?; // [B, w, H/4, W/4]
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
        }
        Ok(x)
    }
}

/// `nn.MaxPool2d(3, stride=2, padding=1)` on `x: [B, C, H, W]` with every value >= 0 (it
/// follows a ReLU): zero padding then equals PyTorch's -inf padding, since every window
/// holds a real value. The maximum of nine strided views, so it has a gradient (candle's
/// `max_pool2d` has none when the stride differs from the kernel).
fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // one padding on the top/left, two on the bottom/right: the extra row and column only
    // complete the last pair of the stride-2 split and are never read
    let xp = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 1, 2)?; // [B, C, H+3, W+3]
    let wp = w + 3;
    let mut out: Option<Tensor> = None;
    for ky in 0..3 {
        let rows = xp
            .narrow(2, ky, 2 * oh)?
            .reshape((b, c, oh, 2, wp))?
            .i((.., .., .., 0))?; // [B, C, oh, W+3]: rows ky, ky+2, ...
        for kx in 0..3 {
            let v =
                rows.narrow(3, kx, 2 * ow)?
                    .reshape((b, c, oh, ow, 2))?
                    .i((.., .., .., .., 0))?; // [B, C, oh, ow]
            out = Some(match out {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    out.expect("nine views").contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn shapes_strides_and_buffer_names() -> Result<()> {
        let dev = Device::Cpu;
        for dilation in [false, true] {
            let map = VarMap::new();
            let cfg = ResNetConfig {
                layers: [1, 2, 1, 2],
                width: 2,
                dilation,
            };
            let net = ResNet::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
            let y = net.forward(&Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &dev)?)?;
            let s = cfg.stride();
            assert_eq!(y.dims(), &[2, cfg.out_channels(), 64 / s, 96 / s]);
            let names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
            assert!(names.contains(&"layer4.0.downsample.1.running_var".to_string()));
            for n in &names {
                let buffer =
                    n.contains(".bn") || n.starts_with("bn1") || n.contains("downsample.1");
                assert_eq!(is_frozen_buffer(n), buffer, "{n}");
            }
        }
        assert_eq!(ResNetConfig::resnet101().name(), Some("resnet101"));
        assert_eq!(ResNetConfig::resnet50().out_channels(), 2048);
        Ok(())
    }

    #[test]
    fn max_pool_equals_candles_on_padded_input() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (7, 9), (5, 4)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?.relu()?;
            let want = x
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .max_pool2d_with_stride(3, 2)?;
            let got = max_pool_3x3_s2(&x)?;
            assert_eq!(got.dims(), want.dims());
            let d = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{h}x{w}");
        }
        Ok(())
    }

    #[test]
    fn convolutions_get_gradients_and_buffers_none() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = ResNetConfig {
            layers: [1, 1, 1, 1],
            // Width 8 and two images: at width 2 a whole bottleneck's ReLUs die
            // for about one random init in 14 and a weight honestly gets no gradient.
            width: 8,
            dilation: true,
        };
        let net = ResNet::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        let y = net.forward(&Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev)?)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        for (name, var) in map.data().lock().unwrap().iter() {
            let g = grads.get(var);
            if is_frozen_buffer(name) {
                assert!(g.is_none(), "{name} is a buffer but got a gradient");
            } else {
                let s = g.expect(name).abs()?.sum_all()?.to_scalar::<f32>()?;
                assert!(s.is_finite() && s > 0.0, "{name}: |g| = {s}");
            }
        }
        Ok(())
    }
}
