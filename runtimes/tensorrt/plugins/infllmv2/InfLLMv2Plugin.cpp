// TensorRT 10.x IPluginV3 for ai.edgecpm.InfLLMv2Attention; see InfLLMv2Plugin.h. The library registers its creator
// when it is loaded (REGISTER_TENSORRT_PLUGIN), so loading it with dlopen/ctypes before parsing or deserializing is
// all a process needs (edgecpm.exporters.tensorrt.plugins.load_plugin_library).
#include "InfLLMv2Plugin.h"

#include <cstring>

using namespace nvinfer1;

namespace edgecpm {
namespace {

// The operator's attributes, in edgecpm.sparse.op.InfLLMv2Attributes' order (all INT32 but scale).
struct IntField {
    char const* name;
    int32_t InfLLMv2Params::*member;
};
constexpr IntField kIntFields[] = {
    {"kernel_size", &InfLLMv2Params::kernelSize}, {"kernel_stride", &InfLLMv2Params::kernelStride},
    {"block_size", &InfLLMv2Params::blockSize},   {"init_blocks", &InfLLMv2Params::initBlocks},
    {"local_blocks", &InfLLMv2Params::localBlocks}, {"topk", &InfLLMv2Params::topk},
    {"dense_len", &InfLLMv2Params::denseLen},     {"use_nope", &InfLLMv2Params::useNope},
};
constexpr char const* kScaleField = "scale";

void describeFields(std::vector<PluginField>& fields, PluginFieldCollection& collection, InfLLMv2Params* values) {
    fields.clear();
    for (auto const& f : kIntFields)
        fields.emplace_back(f.name, values ? &(values->*f.member) : nullptr, PluginFieldType::kINT32, 1);
    fields.emplace_back(kScaleField, values ? &values->scale : nullptr, PluginFieldType::kFLOAT32, 1);
    collection.nbFields = static_cast<int32_t>(fields.size());
    collection.fields = fields.data();
}

bool validAttributes(InfLLMv2Params const& p) {
    return p.kernelSize >= 1 && p.kernelStride >= 1 && p.kernelStride <= p.kernelSize && p.blockSize >= 1
        && p.blockSize % p.kernelStride == 0 && p.initBlocks >= 0 && p.localBlocks >= 0 && p.topk >= 0
        && (p.useNope == 0 || p.useNope == 1) && p.scale > 0.f;
}

} // namespace

InfLLMv2Plugin::InfLLMv2Plugin(InfLLMv2Params attributes) : mAttributes(attributes) {}

IPluginCapability* InfLLMv2Plugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* InfLLMv2Plugin::clone() noexcept {
    try {
        return new InfLLMv2Plugin(mAttributes);
    } catch (...) {
        return nullptr;
    }
}

int32_t InfLLMv2Plugin::configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
                                        int32_t nbOutputs) noexcept {
    return nbInputs == expectedInputs() && nbOutputs == 1 ? 0 : -1;
}

int32_t InfLLMv2Plugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                           int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs < 1) return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
}

// output [1, heads, S, v_dim]: the query's shape with the value's last dimension
int32_t InfLLMv2Plugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                                        int32_t nbOutputs, IExprBuilder&) noexcept {
    if (nbInputs != expectedInputs() || nbOutputs != 1 || inputs[0].nbDims != 4 || inputs[2].nbDims != 4) return -1;
    outputs[0] = inputs[0];
    outputs[0].d[3] = inputs[2].d[3];
    return 0;
}

// every input and the output: linear, and all of the query's type (float or half)
bool InfLLMv2Plugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                               int32_t nbOutputs) noexcept {
    if (pos < 0 || pos >= nbInputs + nbOutputs) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    return desc.type == inOut[0].desc.type;
}

namespace {
InfLLMv2Params withShapes(InfLLMv2Params p, Dims const& query, Dims const& key, Dims const& value) {
    p.heads = static_cast<int32_t>(query.d[1]);
    p.newTokens = static_cast<int32_t>(query.d[2]);
    p.dim = static_cast<int32_t>(query.d[3]);
    p.kvHeads = static_cast<int32_t>(key.d[1]);
    p.total = static_cast<int32_t>(key.d[2]);
    p.vDim = static_cast<int32_t>(value.d[3]);
    return p;
}
} // namespace

size_t InfLLMv2Plugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*,
                                        int32_t) const noexcept {
    if (nbInputs < 3) return 0;
    return infllmv2WorkspaceBytes(withShapes(mAttributes, inputs[0].max, inputs[1].max, inputs[2].max));
}

int32_t InfLLMv2Plugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t nbOutputs) noexcept {
    return nbInputs == expectedInputs() && nbOutputs == 1 && in[0].dims.nbDims == 4 ? 0 : -1;
}

int32_t InfLLMv2Plugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                                void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    InfLLMv2Params const p = withShapes(mAttributes, inputDesc[0].dims, inputDesc[1].dims, inputDesc[2].dims);
    if (p.heads % p.kvHeads != 0 || p.newTokens > p.total) return -1;
    bool const half = inputDesc[0].type == DataType::kHALF;
    void const* queryNope = p.useNope ? inputs[3] : nullptr;
    void const* keyNope = p.useNope ? inputs[4] : nullptr;
    cudaError_t const status
        = infllmv2Enqueue(p, half, inputs[0], inputs[1], inputs[2], queryNope, keyNope, outputs[0], workspace, stream);
    return status == cudaSuccess ? 0 : -1;
}

IPluginV3* InfLLMv2Plugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* InfLLMv2Plugin::getFieldsToSerialize() noexcept {
    describeFields(mFields, mFieldCollection, &mAttributes);
    return &mFieldCollection;
}

InfLLMv2PluginCreator::InfLLMv2PluginCreator() { describeFields(mFields, mFieldCollection, nullptr); }

IPluginV3* InfLLMv2PluginCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept {
    try {
        InfLLMv2Params p{};
        p.denseLen = -1;
        bool seen[sizeof(kIntFields) / sizeof(kIntFields[0]) + 1] = {};
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; i++) {
            PluginField const& field = fc->fields[i];
            for (size_t k = 0; k < sizeof(kIntFields) / sizeof(kIntFields[0]); k++)
                if (std::strcmp(field.name, kIntFields[k].name) == 0 && field.type == PluginFieldType::kINT32) {
                    p.*(kIntFields[k].member) = *static_cast<int32_t const*>(field.data);
                    seen[k] = true;
                }
            if (std::strcmp(field.name, kScaleField) == 0 && field.type == PluginFieldType::kFLOAT32) {
                p.scale = *static_cast<float const*>(field.data);
                seen[sizeof(kIntFields) / sizeof(kIntFields[0])] = true;
            }
        }
        for (bool s : seen)
            if (!s) return nullptr; // every attribute is required (edgecpm.sparse.op.InfLLMv2Attributes)
        if (!validAttributes(p)) return nullptr;
        return new InfLLMv2Plugin(p);
    } catch (...) {
        return nullptr;
    }
}

REGISTER_TENSORRT_PLUGIN(InfLLMv2PluginCreator);

} // namespace edgecpm
