// Which oneDNN post-op chains keep NaN through a ReLU (a 1x1 conv whose pre-activations are NaN,
// fp32 and bf16, nhwc). Build and run: g++ -O1 -std=c++17 bench/dnnl_nan_probe.cpp -ldnnl -o /tmp/p && /tmp/p
#include <oneapi/dnnl/dnnl.hpp>
#include <cmath>
#include <cstdio>
#include <vector>
#include <cstring>
using namespace dnnl;
using dt = memory::data_type; using tag = memory::format_tag;
static float bf2f(uint16_t b){uint32_t u=uint32_t(b)<<16; float f; memcpy(&f,&u,4); return f;}
static uint16_t f2bf(float f){uint32_t u; memcpy(&u,&f,4); return uint16_t(u>>16);}
int main(){
  engine eng(engine::kind::cpu,0); stream s(eng);
  const int C=64, H=4, W=4;
  const char* names[]={"relu","clip(0,inf)","clip_v2(0,inf)","binary_max(0)","relu(alpha=-0.0)","linear(-1)+binary_min(0)+linear(-1)","none"};
  for (dt d : {dt::f32, dt::bf16}) for (int chain=0; chain<7; ++chain) {
    memory::desc src({1,C,H,W}, d, tag::nhwc), dst({1,C,H,W}, d, tag::nhwc), wei({C,C,1,1}, d, tag::any), wuser({C,C,1,1}, dt::f32, tag::oihw);
    convolution_forward::desc cd(prop_kind::forward_inference, algorithm::convolution_direct, src, wei, dst, {1,1},{0,0},{0,0});
    post_ops po; primitive_attr attr; memory::desc zmd({1,1,1,1}, dt::f32, tag::nchw);
    switch(chain){
      case 0: po.append_eltwise(1.f, algorithm::eltwise_relu, 0.f, 0.f); break;
      case 1: po.append_eltwise(1.f, algorithm::eltwise_clip, 0.f, INFINITY); break;
      case 2: po.append_eltwise(1.f, algorithm::eltwise_clip_v2, 0.f, INFINITY); break;
      case 3: po.append_binary(algorithm::binary_max, zmd); break;
      case 4: po.append_eltwise(1.f, algorithm::eltwise_relu, -0.f, 0.f); break;
      case 5: po.append_eltwise(1.f, algorithm::eltwise_linear, -1.f, 0.f); po.append_binary(algorithm::binary_min, zmd); po.append_eltwise(1.f, algorithm::eltwise_linear, -1.f, 0.f); break;
    }
    attr.set_post_ops(po);
    convolution_forward::primitive_desc pd;
    try { pd = convolution_forward::primitive_desc(cd, attr, eng); } catch (error& e) { printf("%s %s: unsupported (%s)\n", d==dt::f32?"f32":"bf16", names[chain], e.what()); continue; }
    std::vector<float> wv(C*C,0.f); for(int i=0;i<C;++i) wv[i*C+i]=1.f;
    memory wu(wuser, eng, wv.data()); memory wm(pd.weights_desc(), eng); reorder(wu,wm).execute(s,wu,wm);
    memory sm(src, eng), dm(dst, eng), zm(zmd, eng); *(float*)zm.get_data_handle()=0.f;
    int n=C*H*W; float vals[4]={NAN,-1.f,2.f,-INFINITY};
    for(int i=0;i<n;++i){ float v=vals[i%4]; if(d==dt::f32) ((float*)sm.get_data_handle())[i]=v; else ((uint16_t*)sm.get_data_handle())[i]=f2bf(v);}
    std::unordered_map<int,memory> args={{DNNL_ARG_SRC,sm},{DNNL_ARG_WEIGHTS,wm},{DNNL_ARG_DST,dm}};
    if(chain==3) args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0)|DNNL_ARG_SRC_1]=zm;
    if(chain==5) args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(1)|DNNL_ARG_SRC_1]=zm;
    convolution_forward(pd).execute(s,args); s.wait();
    auto get=[&](int i){return d==dt::f32?((float*)dm.get_data_handle())[i]:bf2f(((uint16_t*)dm.get_data_handle())[i]);};
    // identity weights: out channel c = in channel c; NaN*0 from other channels -> all NaN rows; use pixel-wise: every pixel has channels with value pattern i%4
    printf("%s %s impl=%s: out[c=0..3] = %g %g %g %g\n", d==dt::f32?"f32":"bf16", names[chain], pd.impl_info_str(), get(0),get(1),get(2),get(3));
  }
}
