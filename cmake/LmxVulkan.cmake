# LmxVulkan.cmake — the optional Vulkan device: finds the headers and glslc, compiles
# engine/shaders/*.comp to SPIR-V and embeds them in lmx_core as C++ arrays.
# Owner: the Vulkan device (engine/src/vulkan). Included once by CMakeLists.txt.
#
# LMX_VULKAN = AUTO (default: build it when vulkan/vulkan.h and glslc are found), ON
# (fail when they are not), OFF. The loader (libvulkan.so.1) is never linked: the engine
# dlopens it at run time, so a machine without it still imports the engine and runs on
# the CPU. LMX_HAVE_VULKAN (0/1) tells the C++ which way the build went.
set(LMX_VULKAN AUTO CACHE STRING "Build the Vulkan device: AUTO | ON | OFF")
set_property(CACHE LMX_VULKAN PROPERTY STRINGS AUTO ON OFF)

set(LMX_HAVE_VULKAN 0)
if(NOT LMX_VULKAN STREQUAL "OFF")
  find_path(LMX_VULKAN_INCLUDE_DIR vulkan/vulkan.h HINTS ENV VULKAN_SDK PATH_SUFFIXES include)
  find_program(LMX_GLSLC glslc HINTS ENV VULKAN_SDK PATH_SUFFIXES bin)
  if(LMX_VULKAN_INCLUDE_DIR AND LMX_GLSLC)
    set(LMX_HAVE_VULKAN 1)
  elseif(LMX_VULKAN STREQUAL "ON")
    message(FATAL_ERROR "LMX_VULKAN=ON: expected vulkan/vulkan.h and glslc, found headers='${LMX_VULKAN_INCLUDE_DIR}' "
                        "glslc='${LMX_GLSLC}'; install libvulkan-dev and glslc (or set VULKAN_SDK)")
  else()
    message(STATUS "layermux: Vulkan device not built (vulkan/vulkan.h or glslc not found); CPU only")
  endif()
endif()

# Always compiled: vk_probe.cpp answers "was Vulkan built, is there a device" either way.
target_sources(lmx_core PRIVATE ${CMAKE_CURRENT_LIST_DIR}/../engine/src/vulkan/vk_probe.cpp)
target_compile_definitions(lmx_core PUBLIC LMX_HAVE_VULKAN=${LMX_HAVE_VULKAN})

if(LMX_HAVE_VULKAN)
  message(STATUS "layermux: Vulkan device built (headers ${LMX_VULKAN_INCLUDE_DIR}, ${LMX_GLSLC})")
  file(GLOB LMX_SHADERS CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/../engine/shaders/*.comp)
  file(GLOB LMX_SHADER_INCLUDES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/../engine/shaders/*.glsl)
  set(LMX_SPV_DIR ${CMAKE_CURRENT_BINARY_DIR}/shaders)
  file(MAKE_DIRECTORY ${LMX_SPV_DIR})
  set(LMX_SPVS "")
  foreach(src ${LMX_SHADERS})
    get_filename_component(stem ${src} NAME_WE)
    set(spv ${LMX_SPV_DIR}/${stem}.spv)
    add_custom_command(OUTPUT ${spv}
      COMMAND ${LMX_GLSLC} --target-env=vulkan1.2 -O -Werror -o ${spv} ${src}
      DEPENDS ${src} ${LMX_SHADER_INCLUDES}
      COMMENT "glslc ${stem}.comp" VERBATIM)
    list(APPEND LMX_SPVS ${spv})
  endforeach()
  set(LMX_SPV_CPP ${LMX_SPV_DIR}/vk_shaders_embedded.cpp)
  add_custom_command(OUTPUT ${LMX_SPV_CPP}
    COMMAND ${CMAKE_COMMAND} -DOUT=${LMX_SPV_CPP} "-DSPVS=${LMX_SPVS}" -P ${CMAKE_CURRENT_LIST_DIR}/LmxEmbedSpirv.cmake
    DEPENDS ${LMX_SPVS} ${CMAKE_CURRENT_LIST_DIR}/LmxEmbedSpirv.cmake
    COMMENT "embedding SPIR-V" VERBATIM)
  file(GLOB LMX_VK_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/../engine/src/vulkan/*.cpp)
  list(FILTER LMX_VK_SOURCES EXCLUDE REGEX ".*/vk_probe\\.cpp$")
  target_sources(lmx_core PRIVATE ${LMX_VK_SOURCES} ${LMX_SPV_CPP})
  target_include_directories(lmx_core SYSTEM PUBLIC ${LMX_VULKAN_INCLUDE_DIR})
  # Vulkan structs are filled field by field after {sType}: not an omission.
  set_source_files_properties(${LMX_VK_SOURCES} ${CMAKE_CURRENT_LIST_DIR}/../engine/tests/test_vulkan.cpp
    PROPERTIES COMPILE_OPTIONS -Wno-missing-field-initializers)
  target_link_libraries(lmx_core PUBLIC ${CMAKE_DL_LIBS})
endif()
