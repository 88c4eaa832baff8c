// vulkan/vk_loader.h — the Vulkan entry points, loaded from libvulkan.so.1 at run time.
// Owner: the Vulkan device. The engine never links the loader: a machine without it
// imports the engine and runs on the CPU; asking for Vulkan there is a clear error.
// Thread-safety: vk_load_* write the table once under a lock; calls are then read-only.
#pragma once

#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <string>

namespace lmx::vk {

#define LMX_VK_GLOBAL_FNS(X)               \
    X(vkCreateInstance)                    \
    X(vkEnumerateInstanceLayerProperties)  \
    X(vkEnumerateInstanceExtensionProperties) \
    X(vkEnumerateInstanceVersion)

#define LMX_VK_INSTANCE_FNS(X)                  \
    X(vkDestroyInstance)                        \
    X(vkEnumeratePhysicalDevices)               \
    X(vkGetPhysicalDeviceProperties)            \
    X(vkGetPhysicalDeviceProperties2)           \
    X(vkGetPhysicalDeviceFeatures2)             \
    X(vkGetPhysicalDeviceQueueFamilyProperties) \
    X(vkGetPhysicalDeviceMemoryProperties)      \
    X(vkEnumerateDeviceExtensionProperties)     \
    X(vkCreateDevice)                           \
    X(vkGetDeviceProcAddr)

#define LMX_VK_DEBUG_FNS(X)             \
    X(vkCreateDebugUtilsMessengerEXT)   \
    X(vkDestroyDebugUtilsMessengerEXT)

#define LMX_VK_DEVICE_FNS(X)         \
    X(vkDestroyDevice)               \
    X(vkGetDeviceQueue)              \
    X(vkAllocateMemory)              \
    X(vkFreeMemory)                  \
    X(vkMapMemory)                   \
    X(vkUnmapMemory)                 \
    X(vkCreateBuffer)                \
    X(vkDestroyBuffer)               \
    X(vkGetBufferMemoryRequirements) \
    X(vkBindBufferMemory)            \
    X(vkCreateShaderModule)          \
    X(vkDestroyShaderModule)         \
    X(vkCreateDescriptorSetLayout)   \
    X(vkDestroyDescriptorSetLayout)  \
    X(vkCreatePipelineLayout)        \
    X(vkDestroyPipelineLayout)       \
    X(vkCreateComputePipelines)      \
    X(vkDestroyPipeline)             \
    X(vkCreateDescriptorPool)        \
    X(vkDestroyDescriptorPool)       \
    X(vkResetDescriptorPool)         \
    X(vkAllocateDescriptorSets)      \
    X(vkUpdateDescriptorSets)        \
    X(vkCreateCommandPool)           \
    X(vkDestroyCommandPool)          \
    X(vkAllocateCommandBuffers)      \
    X(vkResetCommandBuffer)          \
    X(vkBeginCommandBuffer)          \
    X(vkEndCommandBuffer)            \
    X(vkCmdBindPipeline)             \
    X(vkCmdBindDescriptorSets)       \
    X(vkCmdPushConstants)            \
    X(vkCmdDispatch)                 \
    X(vkCmdPipelineBarrier)          \
    X(vkCmdCopyBuffer)               \
    X(vkQueueSubmit)                 \
    X(vkDeviceWaitIdle)              \
    X(vkCreateSemaphore)             \
    X(vkDestroySemaphore)            \
    X(vkWaitSemaphores)              \
    X(vkGetSemaphoreCounterValue)    \
    X(vkCreateQueryPool)             \
    X(vkDestroyQueryPool)            \
    X(vkCmdResetQueryPool)           \
    X(vkCmdWriteTimestamp)           \
    X(vkGetQueryPoolResults)

struct Fns {
#define LMX_VK_DECL(name) PFN_##name name = nullptr;
    LMX_VK_GLOBAL_FNS(LMX_VK_DECL)
    LMX_VK_INSTANCE_FNS(LMX_VK_DECL)
    LMX_VK_DEBUG_FNS(LMX_VK_DECL)
    LMX_VK_DEVICE_FNS(LMX_VK_DECL)
#undef LMX_VK_DECL
    PFN_vkGetInstanceProcAddr vkGetInstanceProcAddr = nullptr;
};

// The one table (instance- and device-level pointers of the last instance/device
// loaded; the engine uses one Vulkan device per process at a time).
Fns& fns();
// dlopens the loader and fills the global-level functions. False with *why set
// ("libvulkan.so.1: cannot open shared object file") when there is none.
bool vk_load_loader(std::string* why);
void vk_load_instance(VkInstance inst);
void vk_load_device(VkDevice dev);

// "VK_ERROR_OUT_OF_DEVICE_MEMORY" and friends.
const char* vk_result_name(VkResult r);

}  // namespace lmx::vk
