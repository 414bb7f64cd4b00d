// TensorRT 10.x IPluginV3 for ai.edgecpm.InfLLMv2Attention (edgecpm/sparse/op.py defines the operator: inputs, output,
// attributes). TensorRT's ONNX parser creates it for a node named InfLLMv2Attention once the graph no longer carries
// the operator's lowering function (edgecpm engine build --sparse-plugin removes it); the node's attributes arrive as
// plugin fields of the same names (INT -> kINT32, FLOAT -> kFLOAT32).
#pragma once

#include "infllmv2Kernels.cuh"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace edgecpm {

constexpr char const* kInfLLMv2Name = "InfLLMv2Attention";
constexpr char const* kInfLLMv2Version = "1";
constexpr char const* kInfLLMv2Namespace = "";

class InfLLMv2Plugin final : public nvinfer1::IPluginV3,
                             public nvinfer1::IPluginV3OneCore,
                             public nvinfer1::IPluginV3OneBuild,
                             public nvinfer1::IPluginV3OneRuntime {
public:
    explicit InfLLMv2Plugin(InfLLMv2Params attributes);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kInfLLMv2Name; }
    char const* getPluginVersion() const noexcept override { return kInfLLMv2Version; }
    char const* getPluginNamespace() const noexcept override { return kInfLLMv2Namespace; }

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override { return 1; }
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    int32_t expectedInputs() const { return mAttributes.useNope ? 5 : 3; }

private:
    InfLLMv2Params mAttributes; // shapes are filled per call from the tensor descriptors
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class InfLLMv2PluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    InfLLMv2PluginCreator();
    char const* getPluginName() const noexcept override { return kInfLLMv2Name; }
    char const* getPluginVersion() const noexcept override { return kInfLLMv2Version; }
    char const* getPluginNamespace() const noexcept override { return kInfLLMv2Namespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace edgecpm
